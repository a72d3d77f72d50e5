"""The README's compression section is one flow that works as written: every command of its marked code block
runs, in order, on the real MiniLM and Rotten Tomatoes (with --limit 120 and one epoch so it takes a minute)."""

import json
import re
import shlex
from pathlib import Path

import pytest

from lamina.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- compression-flow"


def flow_commands() -> list[str]:
    text = README.read_text()
    assert MARK in text, "the README lost its compression-flow block"
    block = text.split(MARK, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def small(cmd: str) -> list[str]:
    """The README's command with a small limit and one epoch (the only changes), without progress bars."""
    args = shlex.split(re.sub(r"--limit \d+", "--limit 120", cmd))
    assert args[0] == "lamina"
    verb = args[1]
    if verb in ("finetune", "distill"):
        args += ["--epochs", "1"]
    if verb == "bench":
        args += ["--repeats", "3", "--warmup", "1"]
    if verb in ("finetune", "distill", "bench", "capture", "analyze"):
        args += ["--no-progress"]
    return args[1:]


def test_the_flow_block_is_the_order_a_user_needs():
    verbs = [shlex.split(c)[1] for c in flow_commands()]
    assert verbs == ["finetune", "prune", "distill", "bench", "capture", "analyze", "report"]
    assert "--scores" not in flow_commands()[1]  # prune computes the importance it needs


@pytest.mark.assets
@pytest.mark.slow
def test_readme_compression_flow_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for cmd in flow_commands():
        rc = main(small(cmd))
        out = capsys.readouterr()
        assert rc == 0, f"{cmd}\n{out.err[-3000:]}"
        if not cmd.startswith("lamina report"):
            assert "next: lamina " in out.out, cmd  # every stage says what to run next
    plan = json.loads((tmp_path / "small" / "plan.json").read_text())
    assert plan["result"]["scores_computed_by"] == "prune" and plan["depth"]["n_removed"] == 3
    # the default --method auto: the teacher's own task rows are calibration rows, so blocks are chosen jointly
    assert plan["depth"]["method_requested"] == "auto" and plan["depth"]["method"] == "joint"
    bench = json.loads((tmp_path / "recovered" / "bench.json").read_text())
    assert [Path(m["model"]).name for m in bench["models"]] == ["teacher", "small", "recovered"]
    html = (tmp_path / "run" / "report.html").read_text()
    for name in ("teacher", "small", "recovered"):
        assert f"<td>{name}</td>" in html
    assert len(re.findall(r'id="lat-point-\d+"', html)) == 3
