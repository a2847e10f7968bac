"""The bad-input tables of docs/quickstart.md and docs/conversion.md, run row by row: each command,
in the directory ``bad_input_sandbox.make_sandbox`` makes, exits with status 2 and prints the
documented message (a row whose message drifts from the code fails here).

The scripts' ``main(argv)`` run in this process (torch and transformers are imported once, not once
per row); ``tests/test_cli.py`` runs the same entry points as separate processes."""
import contextlib
import importlib.util
import io
import pathlib
import re
import shlex

import pytest

from bad_input_sandbox import make_sandbox

pytestmark = pytest.mark.ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("docs/quickstart.md", "docs/conversion.md")
ROW = re.compile(r"^\| (?P<case>[^|]+) \| `(?P<command>python [^`]+)` \| `(?P<message>[^`]+)` \|$")


def rows():
    out = []
    for doc in DOCS:
        section = (ROOT / doc).read_text(encoding="utf-8").split("## When the input is wrong", 1)[1]
        section = section.split("\n## ", 1)[0]
        for line in section.splitlines():
            m = ROW.match(line)
            if m:
                out.append(pytest.param(m["command"], m["message"], id=f"{doc}: {m['case']}"))
            elif line.startswith("| ") and "---" not in line and not line.startswith("| case"):
                raise AssertionError(f"{doc}: a table row this test cannot read: {line}")
    return out


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    return make_sandbox(str(tmp_path_factory.mktemp("bad-input")), str(ROOT))


def test_every_section_has_rows():
    assert len(rows()) >= 20


_MODULES = {}


def _script(path: pathlib.Path):
    if path not in _MODULES:
        spec = importlib.util.spec_from_file_location(f"_bad_input_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[path] = module
    return _MODULES[path]


@pytest.mark.parametrize("command,message", rows())
def test_documented_bad_input_gets_the_documented_message(sandbox, monkeypatch, command, message):
    argv = shlex.split(command)
    assert argv[0] == "python"
    main = _script(ROOT / argv[1]).main
    monkeypatch.chdir(sandbox)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv[2:])
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    assert code == 2, (code, err.getvalue()[-2000:])
    assert message in err.getvalue(), err.getvalue()[-2000:]
