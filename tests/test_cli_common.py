"""What the command groups share (gateway/cli/_common.py): the one table renderer, which
counts wide CJK characters as two columns, and the store a command opens and closes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gateway.cli._common import open_store, read_json, table, width
from gateway.config.model import parse_config
from tests.conftest import Keys, config_document


def test_width_counts_wide_and_full_width_characters_twice() -> None:
    """CJK ideographs and full-width forms take two terminal columns, others one."""
    assert (width("abc"), width("张三丰"), width("（Ａ）"), width("a张")) == (3, 6, 6, 3)


def test_table_aligns_cjk_cells_by_their_columns_on_screen() -> None:
    """Columns start at the same screen column whatever the cells' scripts; right-aligned
    columns end there; nested white space is folded; the count line is pluralised."""
    text = table(
        ("NAME", "N", "NOTE"),
        [["张三丰", "7", "a\n b"], ["li", "12", "-"]],
        ("person", "people"),
        right=("N",),
    )
    assert text.splitlines() == [
        "NAME     N  NOTE",
        "张三丰   7  a b",
        "li      12  -",
        "2 people",
    ]
    assert table(("A",), [["x"]], ("row", "rows")).splitlines()[-1] == "1 row"
    assert table(("A", "B"), []) == "A  B"  # no noun: no count line


async def test_open_store_closes_the_store_when_the_command_fails(
    keys: Keys, tmp_path: Path
) -> None:
    """The store is open inside the block and closed after it, also when the block raises
    (SQLite removes the write-ahead log when its last connection closes)."""
    doc = config_document(keys, store=tmp_path / "gateway.db", national_url="http://127.0.0.1:9")
    config = parse_config(doc, base=tmp_path)
    wal = tmp_path / "gateway.db-wal"
    seen: list[bool] = []

    async def failing_command() -> None:
        async with open_store(config) as store:
            seen.append(await store.list_tokens() == [] and wal.exists())
            raise RuntimeError("command failed")

    with pytest.raises(RuntimeError, match="command failed"):
        await failing_command()
    assert seen == [True]
    assert not wal.exists()


class _Refused(Exception):
    pass


def test_read_json_raises_the_callers_error_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_json (every command's input file): a document from a file or stdin ``-``; a
    missing file or one that is not JSON raises the caller's own error naming the path."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"a": 1}', encoding="utf-8")
    bad.write_bytes(b"{not json")
    assert read_json(str(good), _Refused) == {"a": 1}
    monkeypatch.setattr("sys.stdin", io.StringIO("[2]"))
    assert read_json("-", _Refused) == [2]
    with pytest.raises(_Refused, match=r"bad\.json: not a JSON document"):
        read_json(str(bad), _Refused)
    with pytest.raises(_Refused, match=r"absent\.json: No such file"):
        read_json(str(tmp_path / "absent.json"), _Refused)
