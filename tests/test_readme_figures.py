"""The README quotes what the benchmark JSONs say, and the JSONs are written by the benchmark scripts.

- every entry of benchmarks/readme_figures.toml (format described at its top), rendered from its JSON, appears in
  README.md: a README figure edited by hand, or a JSON re-measured without updating the README, fails;
- every JSON under benchmarks/results/ is named by a benchmark script (a file no script writes was made by hand);
- every committed benchmark script writes its JSON through benchmarks/_record.py (the "meta" block: commit, command
  line, start and end time).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MANIFEST = ROOT / "benchmarks" / "readme_figures.toml"
UNITS = {"%": 100.0, "ms": 1000.0, "h": 1 / 3600, "M": 1e-6, "MB": 1e-6, "KiB": 2.0**-10, "MiB": 2.0**-20,
         "GiB": 2.0**-30}


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def lookup(obj, path: str):
    for part in path.split("/"):
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    return obj


def _per_key(value, n: int, name: str) -> list:
    values = value if isinstance(value, list) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} given for {n} keys")
    return values


def render(entry: dict, results: Path = RESULTS) -> str:
    """The README text of one manifest entry, with every figure formatted from its JSON."""
    keys = entry["keys"] if "keys" in entry else [entry["key"]]
    data = json.loads((results / entry["json"]).read_text())
    formats = _per_key(entry["format"], len(keys), "format")
    scales = _per_key(entry.get("scale", 1), len(keys), "scale")
    cells = []
    for key, fmt, scale in zip(keys, formats, scales):
        value = lookup(data, key)
        if not isinstance(value, int) or scale != 1:
            value = float(value) * (UNITS[scale] if isinstance(scale, str) else scale)
        cell = fmt.format(value)
        if "minus" in entry and cell.startswith("-"):
            cell = entry["minus"] + cell[1:]
        cells.append(cell)
    text = entry.get("text", "{}")
    if text.count("{}") != len(keys):
        raise ValueError(f"text has {text.count('{}')} '{{}}' for {len(keys)} keys: {text!r}")
    return text.format(*cells)


def missing_figures(readme: str, manifest: list[dict], results: Path = RESULTS) -> list[str]:
    """Rendered entries that README.md does not contain (whitespace runs count as one space)."""
    page = squash(readme)
    return [f"{e['json']}: {render(e, results)!r}" for e in manifest if squash(render(e, results)) not in page]


def load_manifest() -> list[dict]:
    return tomllib.loads(MANIFEST.read_text())["figure"]


def test_every_readme_figure_matches_its_json():
    manifest = load_manifest()
    assert len(manifest) >= 40
    missing = missing_figures((ROOT / "README.md").read_text(), manifest)
    assert not missing, "README.md does not say what the JSON says:\n" + "\n".join(missing)


def test_a_figure_edited_by_hand_is_caught():
    readme, manifest = (ROOT / "README.md").read_text(), load_manifest()
    entry = next(e for e in manifest if e["json"] == "cliperase.json" and "FM only" in e.get("text", ""))
    row = squash(render(entry))
    squashed = squash(readme)
    assert row in squashed
    retyped = re.sub(r"\| \d+\.\d %", "| 52.5 %", row, count=1)  # one figure retyped
    assert retyped != row
    edited = squashed.replace(row, retyped)
    assert missing_figures(edited, [entry]) == [f"cliperase.json: {row!r}"]


def test_manifest_entries_are_well_formed():
    for e in load_manifest():
        assert set(e) <= {"json", "key", "keys", "format", "scale", "text", "minus"}, e
        assert ("key" in e) != ("keys" in e), e
        for s in e.get("scale", []) if isinstance(e.get("scale"), list) else [e.get("scale", 1)]:
            assert isinstance(s, (int, float)) or s in UNITS, e
        assert (RESULTS / e["json"]).is_file(), e
        render(e)  # one "{}" per key, one format / scale per key


def test_every_result_json_is_written_by_a_benchmark_script():
    scripts = {p.name: p.read_text() for p in (ROOT / "benchmarks").glob("bench_*.py")}
    for path in sorted(RESULTS.rglob("*.json")):
        top = path.relative_to(RESULTS).parts[0]  # cost.json, or evaluate/ for evaluate/<method>/metrics.json
        writers = [name for name, src in scripts.items() if f'"{top}"' in src]
        assert writers, f"{path.relative_to(ROOT)} is written by no benchmarks/bench_*.py: made by hand?"


def _committed_scripts() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "benchmarks/bench_*.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every script there
        return sorted((ROOT / "benchmarks").glob("bench_*.py"))
    return [ROOT / p for p in out]


def test_benchmarks_write_their_json_through_record():
    for path in _committed_scripts():
        src = path.read_text()
        if "write_json" not in src:
            continue
        assert re.search(r"^\s*from (benchmarks\.)?_record import write_json", src, re.M), (
            f"{path.name} writes JSON without benchmarks/_record.py's meta block")
        assert "erase_diffusion.atomic import write_json" not in src, path.name


def test_record_writes_the_meta_block(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from benchmarks import _record

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(sys, "argv", [str(ROOT / "benchmarks" / "bench_x.py"), "--steps", "3", "a b"])
    figures = {"x": 1.5}
    _record.write_json(tmp_path / "x.json", figures)
    out = json.loads((tmp_path / "x.json").read_text())
    assert figures == {"x": 1.5} and out["x"] == 1.5  # the caller's dict is not changed
    meta = out["meta"]
    assert meta["command"] == "OMP_NUM_THREADS=1 python benchmarks/bench_x.py --steps 3 'a b'"
    assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"] or "0" * 40) and isinstance(meta["dirty"], (bool, type(None)))
    assert meta["started"] <= meta["finished"] and meta["finished"].endswith("+00:00")
    _record.write_json(tmp_path / "y.json", {"x": 2}, merged_from=out)
    assert json.loads((tmp_path / "y.json").read_text())["meta"]["merged_from"] == meta


def test_two_runs_merging_into_one_file_keep_each_others_rows(tmp_path):
    """Two benchmark runs (e.g. two concepts on two cores) write_rows(merge=True) into one file, row by row."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import _record

    path = tmp_path / "r.json"

    def run(name):
        rows = []
        for i in range(15):
            rows.append({"run": name, "i": i})
            _record.write_rows(path, {}, rows, rerun=lambda r: r["run"] == name, merge=True)

    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = json.loads(path.read_text())["rows"]
    assert sorted((r["run"], r["i"]) for r in rows) == [(name, i) for name in "ab" for i in range(15)]


@pytest.mark.parametrize("scale, fmt, value, text", [("%", "{:.1f} %", 0.9652777, "96.5 %"),
                                                     ("MiB", "{:.0f} MiB", 77864960, "74 MiB"),
                                                     ("h", "{:.1f} h", 8117.37, "2.3 h"), (1, "{:,}", 589824, "589,824")])
def test_render(tmp_path, scale, fmt, value, text):
    (tmp_path / "r.json").write_text(json.dumps({"a": [{"b": value}]}))
    assert render({"json": "r.json", "key": "a/0/b", "format": fmt, "scale": scale}, tmp_path) == text
    assert render({"json": "r.json", "key": "a/0/b", "format": fmt, "scale": scale, "text": "x {} y"}, tmp_path) == (
        f"x {text} y")


def test_cliperase_time_is_the_runs_own_measurement(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_evaluate import train_seconds

    (tmp_path / "metrics.json").write_text(json.dumps({"train_seconds": 43.0}))
    assert train_seconds(tmp_path / "erase_patch.safetensors") == 43.0
    assert train_seconds(tmp_path / "elsewhere" / "erase_patch.safetensors") is None  # reported "–", never guessed


@pytest.mark.parametrize("script", ["bench_robustness.py", "bench_adversarial.py", "bench_evaluate.py", "bench_scale.py",
                                    "bench_drawn_as.py", "bench_peer_tuning.py"])
def test_readme_tables_are_the_benchmarks_own(script):
    """The tables these benchmarks print from their committed JSON (``--table``) appear in README.md row for row."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--table"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    rows = [line for line in out.splitlines() if line.startswith("|")]
    page = squash((ROOT / "README.md").read_text())
    assert len(rows) >= 3 and not [r for r in rows if squash(r) not in page]
