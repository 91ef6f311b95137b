"""The README's quick start is code users paste first: it must run and print what it claims."""
import pathlib
import re


def test_readme_quickstart_runs_and_prints_the_derived_rule(capsys):
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    claimed = [ln[2:] for ln in block.splitlines() if ln.startswith("# ") and ("S_t" in ln or "ε =" in ln)]
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    for line in claimed:
        assert line in out, line
    assert "OK (tolerance" in out
