import os

import pytest

from tools.errors import UserError


def test_relative_and_absolute_inside(ws):
    (ws.root / "a.txt").write_text("x")
    assert ws.resolve("a.txt", must_exist=True) == ws.root / "a.txt"
    assert ws.resolve(str(ws.root / "a.txt")) == ws.root / "a.txt"


@pytest.mark.parametrize("bad", ["../outside.txt", "/etc/passwd", "sub/../../x"])
def test_outside_refused(ws, bad):
    with pytest.raises(UserError, match="outside the workspace"):
        ws.resolve(bad, field="dataset_path")


def test_symlink_out_refused(ws, tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("s")
    os.symlink(target, ws.root / "link.txt")
    with pytest.raises(UserError, match="outside the workspace"):
        ws.resolve("link.txt")


def test_missing_names_field(ws):
    with pytest.raises(UserError, match="^dataset_path: 'nope.jsonl' does not exist"):
        ws.resolve("nope.jsonl", field="dataset_path", must_exist=True)


def test_atomic_file_leaves_nothing_on_failure(ws):
    with pytest.raises(RuntimeError):
        with ws.atomic_file("out/data.jsonl") as fh:
            fh.write("partial")
            raise RuntimeError("boom")
    assert list((ws.root / "out").iterdir()) == []


def test_atomic_dir_refuses_non_empty_and_cleans_up(ws):
    (ws.root / "merged").mkdir()
    (ws.root / "merged" / "f").write_text("x")
    with pytest.raises(UserError, match="overwrite"):
        with ws.atomic_dir("merged"):
            pass
    with pytest.raises(RuntimeError):
        with ws.atomic_dir("merged", overwrite=True) as tmp:
            (tmp / "g").write_text("y")
            raise RuntimeError("boom")
    assert sorted(p.name for p in ws.root.iterdir()) == ["merged"]
    assert (ws.root / "merged" / "f").exists()
