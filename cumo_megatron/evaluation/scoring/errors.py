"""The user errors of scoring: inputs that cannot be scored, and benchmarks that need a GPT judge."""

from __future__ import annotations

from cumo_megatron.errors import EXIT_CONFIG, EXIT_DATA, EXIT_FAILURE, UserError


class ScoringInputError(UserError, ValueError):
    """A question, answer or annotation file cannot be read or matched: the message names the
    file, the record and what to do."""

    label = "scoring error"
    exit_status = EXIT_DATA


class NotScorable(UserError):
    """The benchmark is not scored here (a GPT judge, or an evaluation server, publishes its
    figure): the message says why and where the answers are, so they can be sent on."""

    label = "not scorable"
    exit_status = EXIT_FAILURE


class UnknownBenchmark(UserError, KeyError):
    """A benchmark name that the registry does not know; the message lists the known ones."""

    label = "configuration error"
    exit_status = EXIT_CONFIG

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


__all__ = ["NotScorable", "ScoringInputError", "UnknownBenchmark"]
