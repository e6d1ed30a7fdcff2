import errno

import pytest

from search.errors import CnnsearchError
from search.files import write_atomic


def test_write_atomic_writes_and_replaces(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, lambda f: f.write(b"one"))
    write_atomic(target, lambda f: f.write(b"two"))
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary file left behind


def test_a_full_disk_keeps_the_previous_file_and_is_one_error(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(b"previous")

    def disk_full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CnnsearchError, match="cannot write .*a.json: No space left on device"):
        write_atomic(target, disk_full)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_crash_while_writing_keeps_the_previous_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_bytes(b"previous")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, interrupted)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@pytest.mark.parametrize("name, fragment", [("missing/a.json", "does not exist"), (".", "is a directory")])
def test_bad_targets_are_one_error(tmp_path, name, fragment):
    with pytest.raises(CnnsearchError, match=fragment):
        write_atomic(tmp_path / name, lambda f: f.write(b"x"))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask_not_the_temporary_files_0600(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "shared.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o666 & ~umask
