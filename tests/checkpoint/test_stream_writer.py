"""cumo_megatron.checkpoint.stream_writer: early writeback, no CRC pass, same bytes.

The checkpoint the streaming save writes through these pieces is checked against megatron's own
writer in test_streaming.py; here: the file writes every byte, hands each chunk to writeback once
(and only written ranges), the CRC setting is restored, and records without CRC load.
"""

from __future__ import annotations

import io
import os
import zipfile

import pytest
import torch

from cumo_megatron.checkpoint import stream_writer
from cumo_megatron.checkpoint.stream_writer import WritebackFile, no_record_crc32, writeback_writer

needs_fadvise = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux-only")


@needs_fadvise
def test_writeback_file_writes_every_byte_and_hands_each_chunk_over_once(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_writer, "WRITEBACK_CHUNK", 1000)
    calls: list[tuple[int, int]] = []
    real_fadvise = os.posix_fadvise

    def spy(fd, offset, length, advice):
        assert advice == os.POSIX_FADV_DONTNEED
        calls.append((offset, length))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    payload = os.urandom(5300)
    pieces = [payload[:700], payload[700:2500], payload[2500:2600], payload[2600:]]
    with WritebackFile(tmp_path / "f.bin") as handle:
        for piece in pieces:
            assert handle.write(piece) == len(piece)
    assert (tmp_path / "f.bin").read_bytes() == payload
    # Writes end at 700, 2500, 2600, 5300: writeback of the new bytes starts at 2500 (>= 1000 of
    # them) and at 5300, and before the second start the pages of the first chunk may go. Never a
    # zero length (fadvise reads it as "to the end of the file").
    assert calls == [(0, 2500), (0, 2500), (2500, 2800)]


@needs_fadvise
def test_writeback_file_writes_on_where_the_file_system_refuses_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_writer, "WRITEBACK_CHUNK", 10)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    with WritebackFile(tmp_path / "f.bin") as handle:
        for _ in range(5):
            handle.write(b"x" * 20)
    assert (tmp_path / "f.bin").read_bytes() == b"x" * 100
    assert len(calls) == 1  # asked once, then left alone


def test_writeback_file_accepts_what_torch_save_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_writer, "WRITEBACK_CHUNK", 4096)
    tensor = torch.randn(3000)
    with WritebackFile(tmp_path / "t.pt") as handle:
        torch.save(tensor, handle)
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True), tensor)


def test_no_record_crc32_skips_the_checksum_loads_and_restores_the_setting():
    tensor = torch.arange(1000, dtype=torch.float32)
    assert torch.serialization.get_crc32_options() is True
    with no_record_crc32():
        assert torch.serialization.get_crc32_options() is False
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
    assert torch.serialization.get_crc32_options() is True
    with pytest.raises(RuntimeError, match="boom"):
        with no_record_crc32():
            raise RuntimeError("boom")
    assert torch.serialization.get_crc32_options() is True

    data_records = [i for i in zipfile.ZipFile(io.BytesIO(buffer.getvalue())).infolist() if "/data/" in i.filename]
    assert data_records and all(record.CRC == 0 for record in data_records)  # no checksum was computed
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=True), tensor)  # torch.load does not check it
    with_crc = io.BytesIO()
    torch.save(tensor, with_crc)
    assert any(i.CRC != 0 for i in zipfile.ZipFile(io.BytesIO(with_crc.getvalue())).infolist() if "/data/" in i.filename)


def test_writeback_writer_is_pytorchs_serial_synced_writer_with_writeback_streams(tmp_path):
    writer = writeback_writer(tmp_path / "ckpt")
    assert writer.single_file_per_rank and writer.thread_count == 1 and writer.sync_files
    with writer.fs.create_stream(tmp_path / "x.distcp", "wb") as stream:
        assert isinstance(stream, WritebackFile)
        stream.write(b"abc")
    with writer.fs.create_stream(tmp_path / "x.distcp", "rb") as stream:
        assert stream.read() == b"abc"
