"""Tests for the generic dataclass config loader (no torch needed)."""

# Postponed annotations on purpose: the loader must resolve string annotations.
from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import pytest
import yaml

from cumo_megatron.config.loader import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    parse_cli,
    save_config,
    to_dict,
    validate_tree,
)

# --------------------------------------------------------------------------- #
# A small schema shaped like the real one
# --------------------------------------------------------------------------- #


class Precision(enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class MoEConfig:
    num_experts: int = 4
    top_k: int = 2

    def validate(self) -> None:
        if self.top_k > self.num_experts:
            raise ConfigError("moe.top_k must be <= num_experts")


@dataclass
class VisionConfig:
    num_layers: int = 12
    hidden_size: int = 768
    moe_layers: tuple[int, ...] = ()
    moe: Optional[MoEConfig] = None
    image_size: tuple[int, int] = (336, 336)


@dataclass
class ModelConfig:
    name: str = "cumo"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: Literal["mlp", "linear", "moe"] = "mlp"
    precision: Precision = Precision.BF16
    level: Level = Level.LOW
    tie_embeddings: bool = False


@dataclass
class DataFile:
    path: str
    weight: float = 1.0


@dataclass
class DataConfig:
    files: list[DataFile] = field(default_factory=list)
    mix: dict[str, float] = field(default_factory=dict)
    seq_length: int | None = None


@dataclass
class TrainConfig:
    lr: float = 1e-3
    iters: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    tags: list[str] = field(default_factory=list)
    extra: Any = None


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run_name: Optional[str] = None


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- #
# from_dict: structure
# --------------------------------------------------------------------------- #


def test_empty_dict_gives_defaults():
    assert from_dict(RootConfig, {}) == RootConfig()


def test_nested_partial_dict_keeps_other_defaults():
    cfg = from_dict(RootConfig, {"model": {"vision": {"num_layers": 24}}})
    assert cfg.model.vision.num_layers == 24
    assert cfg.model.vision.hidden_size == 768
    assert cfg.model.name == "cumo"
    assert isinstance(cfg.model.vision, VisionConfig)


def test_optional_nested_dataclass_from_dict_none_and_absent():
    built = from_dict(VisionConfig, {"moe": {"num_experts": 8}})
    assert built.moe == MoEConfig(num_experts=8, top_k=2)
    assert from_dict(VisionConfig, {"moe": None}).moe is None
    assert from_dict(VisionConfig, {}).moe is None


def test_existing_dataclass_instance_is_accepted():
    moe = MoEConfig(num_experts=16)
    assert from_dict(VisionConfig, {"moe": moe}).moe is moe


def test_list_of_dataclasses():
    cfg = from_dict(DataConfig, {"files": [{"path": "a.json", "weight": 2}, {"path": "b.json"}]})
    assert cfg.files == [DataFile("a.json", 2.0), DataFile("b.json", 1.0)]
    assert isinstance(cfg.files[0].weight, float)


def test_list_element_error_names_index_path():
    with pytest.raises(ConfigError, match=r"data\.files\[1\]\.weight: expected float"):
        from_dict(DataConfig, {"files": [{"path": "a"}, {"path": "b", "weight": "heavy"}]}, "data")


def test_list_element_missing_required_field():
    with pytest.raises(ConfigError, match=r"files\[0\]: missing required field\(s\): path"):
        from_dict(DataConfig, {"files": [{"weight": 2}]})


def test_dict_field_converts_values():
    cfg = from_dict(DataConfig, {"mix": {"a": 1, "b": "2.5"}})
    assert cfg.mix == {"a": 1.0, "b": 2.5}
    with pytest.raises(ConfigError, match=r"mix\.a: expected float"):
        from_dict(DataConfig, {"mix": {"a": [1]}})


def test_pep604_optional_int():
    assert from_dict(DataConfig, {"seq_length": 2048}).seq_length == 2048
    assert from_dict(DataConfig, {"seq_length": None}).seq_length is None
    with pytest.raises(ConfigError, match=r"seq_length: expected int, got str 'long'"):
        from_dict(DataConfig, {"seq_length": "long"})


def test_typing_module_generics():
    @dataclass
    class Legacy:
        xs: typing.List[int] = dataclasses.field(default_factory=list)
        d: typing.Dict[str, typing.Tuple[int, ...]] = dataclasses.field(default_factory=dict)
        u: typing.Union[int, str] = 0

    cfg = from_dict(Legacy, {"xs": [1, 2], "d": {"a": [1, 2]}, "u": "x"})
    assert cfg == Legacy(xs=[1, 2], d={"a": (1, 2)}, u="x")
    assert from_dict(Legacy, {"u": 3}).u == 3


def test_union_prefers_exact_type():
    @dataclass
    class U:
        v: typing.Union[float, str] = 0.0

    assert from_dict(U, {"v": "1.5"}).v == "1.5"  # a str stays a str
    assert from_dict(U, {"v": 2}).v == 2.0


def test_any_field_is_copied_not_aliased():
    extra = {"k": [1, 2]}
    cfg = from_dict(TrainConfig, {"extra": extra})
    assert cfg.extra == extra and cfg.extra is not extra


def test_init_false_fields_are_not_settable():
    @dataclass
    class Derived:
        a: int = 1
        b: int = field(init=False, default=0)

    with pytest.raises(ConfigError, match="unknown key 'b'"):
        from_dict(Derived, {"b": 3})
    assert to_dict(Derived()) == {"a": 1}


def test_non_dataclass_cls_is_a_programming_error():
    with pytest.raises(TypeError):
        from_dict(dict, {})


# --------------------------------------------------------------------------- #
# from_dict: tuples, Literal, enums
# --------------------------------------------------------------------------- #


def test_variadic_tuple_from_list():
    cfg = from_dict(VisionConfig, {"moe_layers": [0, 2, 4]})
    assert cfg.moe_layers == (0, 2, 4)
    with pytest.raises(ConfigError, match=r"moe_layers\[1\]: expected int"):
        from_dict(VisionConfig, {"moe_layers": [0, "two"]})


def test_fixed_tuple_length_checked():
    assert from_dict(VisionConfig, {"image_size": [224, 224]}).image_size == (224, 224)
    with pytest.raises(ConfigError, match="expected 2 items, got 3"):
        from_dict(VisionConfig, {"image_size": [1, 2, 3]})


def test_tuple_rejects_scalar():
    with pytest.raises(ConfigError, match=r"moe_layers: expected tuple\[int, \.\.\.\], got int 3"):
        from_dict(VisionConfig, {"moe_layers": 3})


def test_literal_accepts_choice():
    assert from_dict(ModelConfig, {"projector": "moe"}).projector == "moe"


def test_literal_rejects_other_value_and_lists_choices():
    with pytest.raises(ConfigError) as exc:
        from_dict(ModelConfig, {"projector": "conv"}, "model")
    msg = str(exc.value)
    assert "model.projector" in msg
    assert "'mlp', 'linear', 'moe'" in msg
    assert "'conv'" in msg


def test_literal_is_type_strict():
    @dataclass
    class L:
        x: Literal[1, 2] = 1

    with pytest.raises(ConfigError):
        from_dict(L, {"x": True})  # True == 1, but it is not the choice 1
    assert from_dict(L, {"x": 2}).x == 2


def test_enum_by_value_and_by_name():
    assert from_dict(ModelConfig, {"precision": "fp32"}).precision is Precision.FP32
    assert from_dict(ModelConfig, {"precision": "FP32"}).precision is Precision.FP32
    assert from_dict(ModelConfig, {"level": 2}).level is Level.HIGH
    assert from_dict(ModelConfig, {"level": "HIGH"}).level is Level.HIGH


def test_enum_bad_value_lists_members():
    with pytest.raises(ConfigError) as exc:
        from_dict(ModelConfig, {"precision": "fp8"})
    assert "precision" in str(exc.value)
    assert "BF16 ('bf16')" in str(exc.value)


# --------------------------------------------------------------------------- #
# from_dict: scalar coercion
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "given, expected",
    [(1, 1.0), (0.5, 0.5), ("1e-3", 1e-3), (" 2.5 ", 2.5), ("inf", float("inf"))],
)
def test_float_coercion(given, expected):
    value = from_dict(TrainConfig, {"lr": given}).lr
    assert value == expected and type(value) is float


@pytest.mark.parametrize("given", [True, "fast", [1e-3], None])
def test_float_rejects(given):
    with pytest.raises(ConfigError, match="lr: expected float"):
        from_dict(TrainConfig, {"lr": given})


@pytest.mark.parametrize("given, expected", [(5, 5), ("7", 7), (8.0, 8), ("1e3", 1000)])
def test_int_coercion(given, expected):
    value = from_dict(TrainConfig, {"iters": given}).iters
    assert value == expected and type(value) is int


@pytest.mark.parametrize("given", [True, False, 2.5, "2.5", "many"])
def test_int_rejects_bool_and_lossy_values(given):
    with pytest.raises(ConfigError, match="iters: expected int"):
        from_dict(TrainConfig, {"iters": given})


@pytest.mark.parametrize(
    "given, expected",
    [(True, True), (False, False), ("true", True), ("No", False), ("yes", True),
     ("1", True), ("0", False), (" FALSE ", False)],
)
def test_bool_coercion(given, expected):
    assert from_dict(ModelConfig, {"tie_embeddings": given}).tie_embeddings is expected


@pytest.mark.parametrize("given", [1, 0, "maybe", 1.0, None])
def test_bool_rejects(given):
    with pytest.raises(ConfigError, match="tie_embeddings: expected bool"):
        from_dict(ModelConfig, {"tie_embeddings": given})


def test_str_rejects_number_with_hint():
    with pytest.raises(ConfigError, match="quote the value"):
        from_dict(ModelConfig, {"name": 1.10})


def test_wrong_type_message_has_path_type_and_value():
    with pytest.raises(ConfigError) as exc:
        from_dict(RootConfig, {"model": {"vision": {"num_layers": "deep"}}})
    msg = str(exc.value)
    assert msg.startswith("model.vision.num_layers: ")
    assert "expected int" in msg
    assert "str 'deep'" in msg


def test_null_for_required_type_is_rejected():
    with pytest.raises(ConfigError, match="model.vision: expected VisionConfig, got NoneType None"):
        from_dict(RootConfig, {"model": {"vision": None}})


def test_non_mapping_for_dataclass():
    with pytest.raises(ConfigError, match=r"model: expected ModelConfig, got list"):
        from_dict(RootConfig, {"model": [1, 2]})


# --------------------------------------------------------------------------- #
# from_dict: unknown and missing keys
# --------------------------------------------------------------------------- #


def test_unknown_key_names_path_suggests_and_lists_valid():
    with pytest.raises(ConfigError) as exc:
        from_dict(RootConfig, {"model": {"vision": {"num_layer": 3}}})
    msg = str(exc.value)
    assert "unknown key 'model.vision.num_layer'" in msg
    assert "did you mean 'num_layers'?" in msg
    assert "num_layers, hidden_size, moe_layers, moe, image_size" in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"zzzzzz": 1})
    assert "did you mean" not in str(exc.value)
    assert "Valid keys for TrainConfig: lr, iters" in str(exc.value)


def test_missing_required_fields_are_all_named():
    @dataclass
    class Req:
        a: int
        b: str
        c: int = 0

    with pytest.raises(ConfigError, match=r"Req: missing required field\(s\): a, b"):
        from_dict(Req, {"c": 1})


# --------------------------------------------------------------------------- #
# to_dict
# --------------------------------------------------------------------------- #


def test_to_dict_is_plain_yaml_safe_data():
    cfg = RootConfig()
    cfg.model.vision.moe_layers = (0, 2)
    cfg.model.vision.moe = MoEConfig()
    cfg.data.files = [DataFile("a.json", 2.0)]
    d = to_dict(cfg)
    assert d["model"]["precision"] == "bf16"
    assert d["model"]["level"] == 1 and type(d["model"]["level"]) is int
    assert d["model"]["vision"]["moe_layers"] == [0, 2]
    assert d["model"]["vision"]["image_size"] == [336, 336]
    assert d["model"]["vision"]["moe"] == {"num_experts": 4, "top_k": 2}
    assert d["data"]["files"] == [{"path": "a.json", "weight": 2.0}]
    yaml.safe_dump(d)  # raises on anything that is not plain data


def test_to_dict_inverse_of_from_dict():
    data = {"model": {"vision": {"moe": {"top_k": 1}}}, "train": {"betas": [0.8, 0.9]}}
    cfg = from_dict(RootConfig, data)
    assert from_dict(RootConfig, to_dict(cfg)) == cfg


def test_to_dict_rejects_non_dataclass_and_opaque_values():
    with pytest.raises(TypeError):
        to_dict({"a": 1})
    with pytest.raises(TypeError, match="extra"):
        to_dict(TrainConfig(extra=object()))


# --------------------------------------------------------------------------- #
# apply_overrides
# --------------------------------------------------------------------------- #


def test_override_scalars_are_yaml_parsed():
    out = apply_overrides(
        {"model": {"vision": {"num_layers": 12}}, "train": {"lr": 1e-3}},
        ["model.vision.num_layers=24", "train.lr=1e-4", "model.tie=true", "train.name=abc"],
    )
    assert out["model"]["vision"]["num_layers"] == 24
    assert out["train"]["lr"] == "1e-4"  # YAML 1.1 string; from_dict makes it a float
    assert out["model"]["tie"] is True
    assert out["train"]["name"] == "abc"


def test_override_list_dict_and_null():
    out = apply_overrides(
        {"name": "x"},
        ["model.vision.moe_layers=[0,2,4]", "data.files=[{path: a.json, weight: 2}]", "name=null"],
    )
    assert out["model"]["vision"]["moe_layers"] == [0, 2, 4]
    assert out["data"]["files"] == [{"path": "a.json", "weight": 2}]
    assert out["name"] is None


def test_override_empty_value_is_empty_string():
    assert apply_overrides({}, ["name="]) == {"name": ""}


def test_override_value_may_contain_equals():
    assert apply_overrides({}, ["expr=a=b"]) == {"expr": "a=b"}


def test_override_does_not_mutate_input():
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2"])
    assert data == {"a": {"b": 1}} and out == {"a": {"b": 2}}


def test_override_replaces_dict_wholesale():
    out = apply_overrides({"a": {"b": 1, "c": 2}}, ["a={b: 3}"])
    assert out == {"a": {"b": 3}}


def test_override_creates_keys_and_fills_null_intermediate():
    out = apply_overrides({"vision": {"moe": None}}, ["vision.moe.num_experts=8", "new.deep.key=1"])
    assert out == {"vision": {"moe": {"num_experts": 8}}, "new": {"deep": {"key": 1}}}


def test_override_indexes_into_lists():
    data = {"files": [{"path": "a", "weight": 1}, {"path": "b", "weight": 1}]}
    out = apply_overrides(data, ["files.1.weight=3", "files.0={path: z}"])
    assert out["files"] == [{"path": "z"}, {"path": "b", "weight": 3}]
    with pytest.raises(ConfigError, match="out of range"):
        apply_overrides(data, ["files.5.weight=1"])
    with pytest.raises(ConfigError, match="integer index"):
        apply_overrides(data, ["files.first.weight=1"])


def test_override_through_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"'train\.lr' is float 0\.1, not a mapping"):
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.value=1"])


@pytest.mark.parametrize("bad", ["model.vision.num_layers", "=3", "a..b=1", " =1", "a.=1"])
def test_malformed_override_names_the_text(bad):
    with pytest.raises(ConfigError) as exc:
        apply_overrides({}, [bad])
    assert repr(bad) in str(exc.value)


def test_override_with_bad_yaml_names_the_text():
    with pytest.raises(ConfigError, match=r"override 'a=\[1, 2'"):
        apply_overrides({}, ["a=[1, 2"])


# --------------------------------------------------------------------------- #
# load_config
# --------------------------------------------------------------------------- #


def test_load_config_defaults_only():
    assert load_config(RootConfig) == RootConfig()


def test_load_config_yaml_merges_over_defaults(tmp_path):
    p = write(tmp_path, "c.yaml", "model:\n  vision:\n    num_layers: 24\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(RootConfig, p)
    assert cfg.model.vision.num_layers == 24
    assert cfg.model.vision.hidden_size == 768
    assert cfg.train.lr == 1e-4


def test_load_config_overrides_beat_yaml(tmp_path):
    p = write(tmp_path, "c.yaml", "train:\n  lr: 0.1\n  iters: 5\n")
    cfg = load_config(RootConfig, str(p), ["train.lr=0.2", "model.vision.moe_layers=[1,3]"])
    assert cfg.train.lr == 0.2 and cfg.train.iters == 5
    assert cfg.model.vision.moe_layers == (1, 3)


def test_load_config_enables_optional_subconfig_by_override():
    cfg = load_config(RootConfig, overrides=["model.vision.moe.num_experts=8"])
    assert cfg.model.vision.moe == MoEConfig(num_experts=8, top_k=2)


def test_load_config_from_base_instance(tmp_path):
    base = RootConfig(run_name="base")
    base.train.iters = 7
    p = write(tmp_path, "c.yaml", "train:\n  lr: 0.5\n")
    cfg = load_config(RootConfig, p, base=base)
    assert cfg.run_name == "base" and cfg.train.iters == 7 and cfg.train.lr == 0.5
    with pytest.raises(TypeError):
        load_config(RootConfig, base=TrainConfig())


def test_load_config_with_required_fields_in_root(tmp_path):
    @dataclass
    class NeedsName:
        name: str
        n: int = 1

    with pytest.raises(ConfigError, match=r"missing required field\(s\): name"):
        load_config(NeedsName)
    assert load_config(NeedsName, overrides=["name=x"]) == NeedsName("x", 1)


def test_load_config_unknown_key_in_yaml(tmp_path):
    p = write(tmp_path, "c.yaml", "train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.learning_rate'"):
        load_config(RootConfig, p)


def test_base_inheritance_relative_path(tmp_path):
    (tmp_path / "bases").mkdir()
    write(
        tmp_path, "bases/model.yaml",
        "model:\n  name: base\n  vision:\n    num_layers: 6\n    hidden_size: 64\n",
    )
    write(tmp_path, "bases/train.yaml", "_base_: model.yaml\ntrain:\n  iters: 10\n  lr: 0.1\n")
    child = write(
        tmp_path, "child.yaml",
        "_base_: bases/train.yaml\nmodel:\n  vision:\n    num_layers: 8\ntrain:\n  lr: 0.2\n",
    )
    cfg = load_config(RootConfig, child)
    assert cfg.model.name == "base"
    assert cfg.model.vision.num_layers == 8  # child wins
    assert cfg.model.vision.hidden_size == 64  # merged from grand-base
    assert cfg.train.iters == 10 and cfg.train.lr == 0.2


def test_base_list_later_wins(tmp_path):
    write(tmp_path, "a.yaml", "train:\n  iters: 1\n  lr: 0.1\n")
    write(tmp_path, "b.yaml", "train:\n  iters: 2\n")
    child = write(tmp_path, "c.yaml", "_base_: [a.yaml, b.yaml]\n")
    cfg = load_config(RootConfig, child)
    assert cfg.train.iters == 2 and cfg.train.lr == 0.1


def test_base_lists_are_replaced_not_concatenated(tmp_path):
    write(tmp_path, "a.yaml", "train:\n  tags: [x, y]\n")
    child = write(tmp_path, "c.yaml", "_base_: a.yaml\ntrain:\n  tags: [z]\n")
    assert load_config(RootConfig, child).train.tags == ["z"]


def test_diamond_bases_are_not_a_cycle(tmp_path):
    write(tmp_path, "root.yaml", "train:\n  iters: 3\n")
    write(tmp_path, "l.yaml", "_base_: root.yaml\n")
    write(tmp_path, "r.yaml", "_base_: root.yaml\n")
    child = write(tmp_path, "c.yaml", "_base_: [l.yaml, r.yaml]\n")
    assert load_config(RootConfig, child).train.iters == 3


def test_base_cycle_detected(tmp_path):
    write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle.*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(RootConfig, tmp_path / "a.yaml")


def test_base_self_cycle_detected(tmp_path):
    p = write(tmp_path, "a.yaml", "_base_: ./a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(RootConfig, p)


def test_base_missing_file(tmp_path):
    p = write(tmp_path, "a.yaml", "_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"not found: .*nope\.yaml"):
        load_config(RootConfig, p)


def test_base_wrong_type(tmp_path):
    p = write(tmp_path, "a.yaml", "_base_: 3\n")
    with pytest.raises(ConfigError, match="_base_ must be a path"):
        load_config(RootConfig, p)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "bad.yaml", "train:\n  lr: 0.1\n  iters: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(RootConfig, p)
    msg = str(exc.value)
    assert str(p) in msg
    # The error surfaces at end of file; the unclosed `[` on line 3 is named too.
    assert "line 4" in msg and "started at line 3" in msg


def test_yaml_duplicate_key_is_rejected_with_line(tmp_path):
    p = write(tmp_path, "dup.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml, line 3.*duplicate key 'lr'"):
        load_config(RootConfig, p)


def test_yaml_merge_key_may_be_overridden(tmp_path):
    # `<<: *anchor` followed by an explicit key is not a duplicate.
    text = "common: &c {lr: 0.1, iters: 4}\ntrain:\n  <<: *c\n  iters: 9\n"
    p = write(tmp_path, "m.yaml", text)
    with pytest.raises(ConfigError, match="unknown key 'common'"):  # proves it parsed
        load_config(RootConfig, p)
    p = write(tmp_path, "m2.yaml", "train:\n  <<: {lr: 0.1, iters: 4}\n  iters: 9\n")
    cfg = load_config(RootConfig, p)
    assert cfg.train.lr == 0.1 and cfg.train.iters == 9


def test_yaml_top_level_must_be_mapping(tmp_path):
    p = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(RootConfig, p)


def test_empty_yaml_file_is_defaults(tmp_path):
    assert load_config(RootConfig, write(tmp_path, "e.yaml", "")) == RootConfig()


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RootConfig, tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- #
# validate() hooks
# --------------------------------------------------------------------------- #

CALLS: list[str] = []


@dataclass
class Leaf:
    tag: str = "leaf"

    def validate(self) -> None:
        CALLS.append(self.tag)


@dataclass
class Mid:
    left: Leaf = field(default_factory=lambda: Leaf("left"))
    items: list[Leaf] = field(default_factory=lambda: [Leaf("i0"), Leaf("i1")])
    by_name: dict[str, Leaf] = field(default_factory=lambda: {"k": Leaf("d0")})
    maybe: Optional[Leaf] = None

    def validate(self) -> None:
        CALLS.append("mid")


@dataclass
class NoHook:
    mid: Mid = field(default_factory=Mid)
    leaf: Leaf = field(default_factory=lambda: Leaf("top-leaf"))


@dataclass
class Top:
    a: NoHook = field(default_factory=NoHook)
    limit: int = 10

    def validate(self) -> None:
        CALLS.append("top")
        if self.limit < 0:
            raise ConfigError("limit must be >= 0")


def test_validate_hooks_run_children_first():
    CALLS.clear()
    load_config(Top, overrides=["a.mid.maybe={tag: opt}"])
    assert CALLS == ["left", "i0", "i1", "d0", "opt", "mid", "top-leaf", "top"]


def test_validate_error_propagates():
    with pytest.raises(ConfigError, match="limit must be >= 0"):
        load_config(Top, overrides=["limit=-1"])


def test_validate_error_from_nested_node(tmp_path):
    text = "model:\n  vision:\n    moe:\n      num_experts: 2\n      top_k: 4\n"
    p = write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError, match="top_k must be <= num_experts"):
        load_config(RootConfig, p)


def test_validate_tree_visits_shared_node_once():
    CALLS.clear()
    shared = Leaf("shared")
    validate_tree(Mid(left=shared, items=[shared], by_name={}))
    assert CALLS == ["shared", "mid"]


# --------------------------------------------------------------------------- #
# save_config round trip
# --------------------------------------------------------------------------- #


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        RootConfig,
        overrides=[
            "model.vision.moe_layers=[0,2]",
            "model.vision.moe={num_experts: 8, top_k: 1}",
            "model.precision=FP32",
            "model.level=2",
            "model.projector=moe",
            "data.files=[{path: a.json, weight: 2}, {path: 'null'}]",
            "data.mix={a: 0.25, b: 0.75}",
            "train.lr=3e-5",
            "train.tags=['yes', '1.10', '']",
            "train.extra={nested: [1, {x: null}]}",
            "run_name='on'",
        ],
    )
    out = tmp_path / "run" / "nested" / "config.yaml"
    save_config(cfg, out)
    again = load_config(RootConfig, out)
    assert again == cfg
    assert again.run_name == "on" and again.data.files[1].path == "null"
    assert list(tmp_path.joinpath("run", "nested").iterdir()) == [out]  # no temp files left


def test_save_config_keeps_field_order(tmp_path):
    out = tmp_path / "c.yaml"
    save_config(RootConfig(), out)
    text = out.read_text()
    order = [text.index(k) for k in ("model:", "data:", "train:", "run_name:")]
    assert order == sorted(order)
    assert text.index("num_layers:") < text.index("hidden_size:") < text.index("moe_layers:")


# --------------------------------------------------------------------------- #
# parse_cli
# --------------------------------------------------------------------------- #


def test_parse_cli_no_args_is_defaults():
    assert parse_cli(RootConfig, []) == RootConfig()


def test_parse_cli_config_and_overrides(tmp_path):
    p = write(tmp_path, "c.yaml", "train:\n  lr: 0.1\n  iters: 5\n")
    cfg = parse_cli(RootConfig, ["--config", str(p), "train.lr=0.2", "model.vision.num_layers=3"])
    assert cfg.train.lr == 0.2 and cfg.train.iters == 5 and cfg.model.vision.num_layers == 3
    cfg = parse_cli(RootConfig, [f"--config={p}", "train.iters=6"])
    assert cfg.train.iters == 6 and cfg.train.lr == 0.1


def test_parse_cli_overrides_apply_in_order():
    assert parse_cli(RootConfig, ["train.iters=1", "train.iters=2"]).train.iters == 2


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--verbose"], "unrecognised argument '--verbose'"),
        (["--train.lr=1"], "overrides take no dashes: 'train.lr=1'"),
        (["positional"], "unrecognised argument 'positional'"),
        (["--config"], "--config needs a file"),
        (["--config="], "--config needs a file"),
        (["--config", "train.lr=1"], None),  # consumed as the file name; not found
        (["--config", "a.yaml", "--config", "b.yaml"], "more than once"),
    ],
)
def test_parse_cli_errors(argv, match):
    with pytest.raises(ConfigError) as exc:
        parse_cli(RootConfig, argv)
    if match is not None:
        assert match in str(exc.value)
        assert "usage:" in str(exc.value)


def test_parse_cli_propagates_validation_errors():
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'; did you mean 'lr'"):
        parse_cli(RootConfig, ["train.lrr=1"])
