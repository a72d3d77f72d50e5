"""The HTML report: self-contained, escaped, tolerant of missing parts, and it renders in Chromium."""

from __future__ import annotations

import dataclasses
import html as htmllib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lamina.errors import LaminaError, UsageError
from lamina.report import GENERATOR, ReportConfig, render_html, report, sample_scores
from lamina.report._scores import parse_scores

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SECTIONS = ("summary", "settings", "accuracy", "geometry", "cka", "importance", "layers", "definitions")
CONFIG = {"capture": {"model": "minilm", "data": "rotten-tomatoes", "pooling": "mean", "batch_size": 32},
          "analyze": {"k": 10, "control": True, "probe_grid": [0.01, 0.1, 1, 10]},
          "versions": {"python": "3.11", "torch": "2.3.0"}}
BENCH = {"device": "cpu", "speedup": 1.83, "batch_sizes": [1, 8, 32],
         "results": [{"model": "original", "batch": 8, "ms": 12.1}, {"model": "compressed", "batch": 8, "ms": 6.6}]}


def _run(tmp_path: Path, scores: dict, name: str = "run", **files) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "scores.json").write_text(json.dumps(scores))
    for fname, data in files.items():
        (run / f"{fname}.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return run


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One report with every part present (control, importance, CKA, config, bench): rendered once."""
    run = _run(tmp_path_factory.mktemp("full"), sample_scores(7), config=CONFIG, bench=BENCH)
    res = report(run)
    return run, res, Path(res.path).read_text(encoding="utf-8")


# ------------------------------------------------------------------ unit ----
def test_sample_scores_is_plausible_and_deterministic():
    s = sample_scores(7)
    assert s == sample_scores(7) and s["synthetic"] is True
    parsed = parse_scores(s, Path("scores.json"))
    assert parsed.layers[0] == "embed" and len(parsed.layers) == 7
    cka = parsed.main.cka
    assert all(cka[i][i] == 1.0 for i in range(7))
    assert all(cka[i][j] == cka[j][i] for i in range(7) for j in range(7))
    assert parsed.control is not None and parsed.main.importance.skippable[0] is False
    assert sample_scores(3, control=False)["control"] is None


def test_report_is_self_contained(full):
    run, res, html = full
    assert res.path == str(run / "report.html")
    # No resource is fetched from anywhere: no URL in src/href (xmlns namespace names are not fetched).
    refs = re.findall(r'(?:\s(?:src|href|xlink:href|action|poster|srcset)\s*=\s*["\']?)([^"\'\s>]*)', html)
    assert refs, "expected at least the navigation links"
    assert all(r.startswith(("#", "data:")) for r in refs), [r for r in refs if not r.startswith(("#", "data:"))]
    assert not re.search(r"url\(\s*['\"]?(?!#)", html), "CSS url() must only point inside the page"
    assert "@import" not in html and "<link" not in html
    assert not re.search(r"<script[^>]*\ssrc", html)
    assert all(t == 'type="application/json"' for t in re.findall(r"<script ([^>]*?) id=", html))
    assert "Content-Security-Policy" in html and f'content="{GENERATOR}' in html
    # One inline <svg> per plot: accuracy, 5 geometry metrics, CKA, importance.
    assert res.plots == 8 == html.count('<svg class="plot"')
    assert "<img" not in html
    for sid in SECTIONS + ("bench",):
        assert f'<section id="{sid}"' in html, sid
    assert res.sections == ["summary", "settings", "accuracy", "geometry", "cka", "importance", "layers", "bench",
                            "definitions"]


def test_every_number_is_on_the_page_and_traceable(full):
    run, _, html = full
    scores = json.loads((run / "scores.json").read_text())
    # The embedded data block is the scores file itself.
    block = re.search(r'<script type="application/json" id="lamina-scores">(.*?)</script>', html, re.S).group(1)
    assert json.loads(block) == scores
    text = htmllib.unescape(re.sub(r"<[^>]+>", " ", html.split('<section id="layers"')[1]))
    for v in scores["metrics"]["knn_acc"] + scores["importance"]["skip_nmse"][1:]:
        assert f"{v:.3f}" in text
    for d in scores["definitions"].values():
        assert htmllib.escape(d, quote=False) in html
    # Settings of every stage from config.json, and the later stage's numbers.
    assert "probe_grid" in html and "rotten-tomatoes" in html and "1.830" in html and "compressed" in html


def test_plots_as_png(tmp_path):
    run = _run(tmp_path, sample_scores(4, control=False))
    res = report(run, ReportConfig(plots="png"))
    html = Path(res.path).read_text()
    assert html.count('<img class="plot"') == res.plots == html.count('src="data:image/png;base64,')
    assert "<svg" not in html


def test_names_and_texts_are_escaped(tmp_path):
    s = sample_scores(4)
    s["model"]["name"] = "<b>bold</b>"
    s["data"]["name"] = "a & b"
    s["layers"][1] = "<i>blk</i>"
    s["definitions"]["knn_acc"] = "</script><script>alert(1)</script>"
    s["extra_note"] = '"><img src=x onerror=alert(1)>'
    html, _ = render_html(_run(tmp_path, s))
    assert "<b>bold" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "<i>blk" not in html and "a &amp; b" in html
    assert "<script>alert" not in html and "<img src=x" not in html
    assert len(re.findall(r"<script", html)) == 1  # only the JSON data block
    block = re.search(r'id="lamina-scores">(.*?)</script>', html, re.S).group(1)
    assert json.loads(block)["model"]["name"] == "<b>bold</b>"


def test_missing_and_null_parts(tmp_path):
    s = sample_scores(7, control=False)
    s["importance"] = None
    s["cka"] = None
    s["metrics"]["knn_acc"][2] = None
    s["metrics"]["effective_rank"] = [None] * 7
    s["metrics"]["cdnv"][0] = float("nan")  # json writes NaN; counts as missing
    s["unknown_key"] = {"anything": [1, 2]}
    del s["definitions"]["cdnv"]
    html, info = render_html(_run(tmp_path, s))
    assert info["sections"] == ["summary", "settings", "accuracy", "geometry", "layers", "definitions"]
    assert 'id="cka"' not in html and 'id="importance"' not in html
    assert "random-init control" not in html and "Random-init control" not in html
    assert info["plots"] == html.count('<svg class="plot"') == 6
    assert "NaN" not in html.split('id="lamina-scores"')[0]


def test_importance_under_analyze_names(tmp_path):
    s = sample_scores(5, control=False)
    s["importance"]["skip_importance"] = s["importance"].pop("skip_nmse")
    s["definitions"]["skip_importance"] = s["definitions"].pop("skip_nmse")
    html, info = render_html(_run(tmp_path, s))
    assert "importance" in info["sections"] and f'{s["importance"]["skip_importance"][2]:.3f}' in html


def test_minimal_scores(tmp_path):
    html, info = render_html(_run(tmp_path, {"layers": ["a", "b"], "metrics": {}}))
    assert info == {"plots": 0, "sections": ["summary", "settings", "layers"]}
    assert "<svg" not in html and "<title>lamina report" in html


def test_later_stages_and_broken_optional_files(tmp_path):
    plan = {"budget": {"fraction": 0.5}, "remove": ["blocks.2", "blocks.3"],
            "why": [{"block": "blocks.2", "skip_nmse": 0.05}, {"block": "blocks.3", "skip_nmse": 0.06}]}
    run = _run(tmp_path, sample_scores(4, control=False), plan=plan, distill="{not json", config="[1, 2]")
    html, info = render_html(run)
    assert info["sections"][-3:] == ["plan", "distill", "definitions"]
    assert "budget.fraction" in html and "blocks.2, blocks.3" in html and "0.060" in html
    assert "distill.json could not be read" in html and "config.json could not be read" in html


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s["metrics"].update(knn_acc=[0.5] * 3), "metrics.knn_acc has 3 values for 7 layers"),
    (lambda s: s.update(cka=[[1.0] * 7] * 6), "cka is not a 7 x 7 matrix"),
    (lambda s: s["metrics"]["probe_acc"].__setitem__(0, "high"), r"metrics.probe_acc\[0\] is not a number"),
    (lambda s: s.pop("layers"), "has no 'layers' list"),
    (lambda s: s["importance"].update(skippable=[True]), "skippable does not have one flag per block"),
    (lambda s: s.update(control=[1]), "'control' is not an object"),
])
def test_bad_scores_are_explained(tmp_path, mutate, match):
    s = sample_scores(7)
    mutate(s)
    with pytest.raises(LaminaError, match=match) as e:
        render_html(_run(tmp_path, s))
    assert "lamina analyze" in str(e.value)


def test_bad_run_folders(tmp_path):
    with pytest.raises(UsageError, match="run folder does not exist"):
        report(tmp_path / "nope")
    with pytest.raises(LaminaError, match="no scores.json") as e:
        report(tmp_path)
    assert "lamina analyze" in str(e.value)
    (tmp_path / "scores.json").write_text('{"layers": [')
    with pytest.raises(LaminaError, match="not valid JSON") as e:
        report(tmp_path)
    assert "line 1" in str(e.value)


def test_output_is_replaced_only_when_ours(tmp_path):
    run = _run(tmp_path, {"layers": ["a", "b"], "metrics": {"x_acc": [0.5, 0.6]}})
    first = report(run)
    assert Path(first.path) == run / "report.html"
    assert report(str(run / "scores.json")).path == first.path  # a scores.json path works too; ours is replaced
    theirs = tmp_path / "notes.html"
    theirs.write_text("<p>my notes</p>")
    for overwrite in (False, True):  # --overwrite never replaces a file lamina did not write
        with pytest.raises(UsageError, match="not a report lamina wrote") as e:
            report(run, ReportConfig(out=str(theirs), overwrite=overwrite))
        assert "move that file away" in str(e.value) and theirs.read_text() == "<p>my notes</p>"
    mine = tmp_path / "mine.html"
    report(run, ReportConfig(out=str(mine)))
    report(run, ReportConfig(out=str(mine), title="Custom"))  # lamina's own report is replaced
    assert "<h1>Custom</h1>" in mine.read_text()
    with pytest.raises(UsageError, match="is a folder"):
        report(run, ReportConfig(out=str(tmp_path)))
    nested = report(run, ReportConfig(out=str(tmp_path / "new" / "r.html")))
    assert Path(nested.path).is_file() and not list((tmp_path / "new").glob("*.tmp"))


def test_config_is_validated_and_documented():
    with pytest.raises(UsageError, match="unknown plot format"):
        ReportConfig(plots="jpg")
    with pytest.raises(UsageError, match="out is empty"):
        ReportConfig(out=" ")
    assert all(f.metadata.get("help") for f in dataclasses.fields(ReportConfig))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ReportConfig().plots = "png"


def test_same_run_folder_same_bytes(tmp_path):
    run = _run(tmp_path, sample_scores(4), config=CONFIG)
    assert render_html(run)[0] == render_html(run)[0]


# ------------------------------------------------------------- chromium ----
def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    msg = ("headless Chromium is not installed, so the report cannot be rendered; run `make install` "
           "(it installs Debian's chromium through scripts/install-system.sh)")
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(msg)
    pytest.skip(msg)


def _headless(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_renders_in_headless_chromium(full, tmp_path):
    exe = _chromium()
    run, res, _ = full
    url = Path(res.path).resolve().as_uri()
    dom = _headless(exe, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    # Rendered, not just written: the browser built every section and every plot, and refused nothing.
    for sid in SECTIONS + ("bench",):
        assert f'id="{sid}"' in dom.stdout, sid
    assert dom.stdout.count('<svg class="plot"') == res.plots
    assert "Content Security Policy" not in dom.stderr, "the page tried to load something from outside"
    assert ":CONSOLE" not in dom.stderr, [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]

    ARTIFACTS.mkdir(exist_ok=True)
    png = ARTIFACTS / "report.png"
    png.unlink(missing_ok=True)
    shot = _headless(exe, tmp_path / "profile", f"--screenshot={png}", "--window-size=1280,4000", url)
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    from PIL import Image
    with Image.open(png) as im:
        assert im.size == (1280, 4000)
        # Not a blank page: many distinct colours (plots) and some dark pixels (text).
        small = im.convert("RGB").resize((320, 1000))
        assert len(set(small.getdata())) > 200
        assert min(sum(p) for p in small.getdata()) < 200
