"""`shrink check`: the CI gate against a committed baseline.

One test runs the real pipeline (distill, export a GGUF with --eval) and checks the build
against a baseline written from it. The failure cases use artifact folders written by
shrink.artifact itself, with realistic metrics and a device target in the manifest.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from shrink import __version__, artifact
from shrink import check as gate
from shrink.cli import cli
from shrink.manifest import Manifest


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def ok(*args):
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return r


def error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[-1]


def failed_line(base, checks: int, *names: str) -> str:
    """The last line of a failed check: how many of `checks` failed, each by artifact and metric."""
    return f"Error: check failed against {base}: {len(names)} of {checks} checks failed ({', '.join(names)})"


def target(retention: float, size_mb: float, max_size_mb: float = 600, min_retention: float = 0.90) -> dict:
    """A device-target section as a manifest carries it (with some of the other keys a
    target's section holds, which the baseline leaves out)."""
    cons = {
        "max_size_mb": {"limit": max_size_mb, "value": size_mb, "met": size_mb <= max_size_mb},
        "min_retention": {"limit": min_retention, "value": retention, "met": retention >= min_retention},
        "parity": {"limit": {"min_top1": 0.85, "max_kl": 0.15}, "value": 0.97, "met": True, "note": "passed"},
    }
    return {"name": "phone", "runtime": "llama.cpp", "file": "targets.toml", "constraints": cons,
            "met": all(c["met"] for c in cons.values())}


EVAL_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # the evaluation file's


def write_artifact(folder, *, kind="export", fmt="gguf", quant="Q4_K_M", size=100_000, valid=True,
                   target_record=None, **metrics):
    """An artifact folder written by shrink.artifact (atomically, manifest last), with the
    target record added to its manifest as target-aware exports do. An evaluated one
    records its evaluation file's sha256, as shrink does."""
    metrics = {"eval_data_sha256": EVAL_SHA if metrics.get("accuracy") is not None else None, **metrics}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with artifact.staged_folder(folder, force=True) as tmp:
        (tmp / f"model-{quant}.gguf").write_bytes(b"\0" * size)
        m = artifact.finish(tmp, kind=kind, format=fmt, source=None,
                            settings={"target": fmt, "quant": quant} if kind == "export" else {},
                            metrics=metrics, valid=valid, target=target_record)
    return m


STUDENT = dict(kind="student", fmt="hf", quant="fp32", size=400_000, accuracy=0.90, teacher_accuracy=0.94,
               retention=0.9574, examples_per_s=55.0, teacher_parameters=1_000_000, eval_runtime="torch")
Q8 = dict(quant="Q8_0", size=120_000, accuracy=0.89, retention=0.9468, examples_per_s=80.0, eval_runtime="llama.cpp")
Q4 = dict(quant="Q4_K_M", size=70_000, accuracy=0.87, retention=0.9255, examples_per_s=95.0, eval_runtime="llama.cpp")


def build(root, **changes):
    """A build folder: a student and two GGUF exports (one in a subfolder), each with
    its figures overridden by `changes[name]`; None leaves an artifact out."""
    specs = {"student": STUDENT, "exports/q8": Q8, "exports/q4": {**Q4, "target_record": target(0.9255, 0.07)}}
    for name, spec in specs.items():
        over = changes.get(name, {})
        if over is None:
            continue
        write_artifact(root / name, **{**spec, **over})
    return root


@pytest.fixture
def baseline(tmp_path):
    """A good build and the baseline written from it; returns (build folder, baseline)."""
    b = build(tmp_path / "build")
    path = tmp_path / "baseline.json"
    ok("check", b, "--baseline", path, "--update")
    return b, path


def rebuild(tmp_path, **changes):
    return build(tmp_path / "build2", **changes)


def check_json(build_dir, base, *extra):
    r = invoke("check", build_dir, "--baseline", base, "--json", *extra)
    return r, json.loads(r.stdout)


def failed(res) -> list[tuple[str, str]]:
    return [(row["artifact"], row["metric"]) for row in res["rows"] if row["status"] == "fail"]


# --- the real pipeline --------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_build(tmp_path_factory, teacher, task_files):
    d = tmp_path_factory.mktemp("ci") / "build"
    d.mkdir()
    ok("distill", "--teacher", teacher, "--data", task_files["train"], "--eval", task_files["eval"],
       "--out", d / "student", "--layers", "2", "--steps", "40", "--batch-size", "16", "--lr", "1e-3",
       "--device", "cpu")
    ok("export", d / "student", "--target", "gguf", "--quant", "Q4_K_M", "--eval", task_files["eval"],
       "--out", d / "student-q4")
    return d


def test_real_build_update_then_check_passes(real_build, tmp_path, task_files):
    base = tmp_path / "ci" / "baseline.json"
    base.parent.mkdir()
    r = ok("check", real_build, "--baseline", base, "--update")
    assert "+ student-q4: added (export gguf Q4_K_M" in r.stderr
    data = json.loads(base.read_text())
    assert data["kind"] == "shrink-baseline" and data["version"] == 1
    assert sorted(data["artifacts"]) == ["student", "student-q4"]
    q4 = Manifest.read(real_build / "student-q4").metrics
    entry = data["artifacts"]["student-q4"]
    assert q4["metric"] == "choice"  # the toy task's rows have choices
    assert entry == {"kind": "export", "format": "gguf", "quant": "Q4_K_M", "metric": "choice", "accuracy": q4["accuracy"],
                     "retention": q4["retention"], "size_bytes": q4["size_bytes"],
                     "examples_per_s": q4["examples_per_s"],
                     "eval_data_sha256": artifact.sha256_file(task_files["eval"]), "valid": True, "target": None}
    assert data["artifacts"]["student"]["eval_data_sha256"] == entry["eval_data_sha256"]
    r, res = check_json(real_build, base, "--check-speed", "--speed-tolerance", "1")
    assert r.exit_code == 0, r.output
    assert res["verdict"] == "pass" and res["counts"] == {"pass": 14}
    assert "check passed" in r.stderr
    assert [p.name for p in base.parent.iterdir()] == ["baseline.json"]  # no temporary file left


# --- pass and fail ------------------------------------------------------------------------

def test_unchanged_build_passes(baseline):
    b, base = baseline
    r, res = check_json(b, base)
    assert r.exit_code == 0, r.output
    assert res["verdict"] == "pass"
    metrics = {(row["artifact"], row["metric"]): row["status"] for row in res["rows"]}
    assert metrics[("exports/q4", "target phone: max_size_mb")] == "pass"
    assert metrics[("exports/q4", "examples/s")] == "not checked"
    assert metrics[("exports/q4", "files")] == metrics[("exports/q4", "eval file")] == "pass"
    assert set(metrics.values()) == {"pass", "not checked"}
    assert "check passed against" in r.stderr


def test_accuracy_drop_fails(baseline, tmp_path):
    _, base = baseline
    r, res = check_json(rebuild(tmp_path, **{"exports/q8": {"accuracy": 0.85}}), base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q8", "accuracy")]
    assert error_line(r) == failed_line(base, 24, "exports/q8 accuracy")
    assert "FAIL exports/q8 accuracy: fell 4.0 pts (89.0% -> 85.0%), more than the 1.0 pts allowed" in r.stderr


def test_accuracy_drop_within_tolerance_passes(baseline, tmp_path):
    _, base = baseline
    b2 = rebuild(tmp_path, **{"exports/q8": {"accuracy": 0.88}})  # exactly the tolerance
    assert invoke("check", b2, "--baseline", base).exit_code == 0
    r = invoke("check", b2, "--baseline", base, "--accuracy-tolerance", "0.005")
    assert r.exit_code == 1 and error_line(r) == failed_line(base, 24, "exports/q8 accuracy")


def test_retention_drop_has_its_own_tolerance(baseline, tmp_path):
    _, base = baseline
    b2 = rebuild(tmp_path, student={"retention": 0.94})  # -1.7 pts
    r = invoke("check", b2, "--baseline", base)
    assert r.exit_code == 1 and error_line(r) == failed_line(base, 24, "student retention")
    assert "FAIL student retention: fell 1.7 pts (95.7% -> 94.0%)" in r.stderr
    assert invoke("check", b2, "--baseline", base, "--retention-tolerance", "0.02").exit_code == 0


def test_size_increase_fails(baseline, tmp_path):
    _, base = baseline
    r, res = check_json(rebuild(tmp_path, **{"exports/q4": {"size": 80_000}}), base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q4", "size")]
    assert error_line(r) == failed_line(base, 24, "exports/q4 size")
    assert "FAIL exports/q4 size: grew 14.3% (70.0 KB -> 80.0 KB), more than the 5% allowed" in r.stderr
    # within the tolerance, and with a looser one
    assert invoke("check", rebuild(tmp_path, **{"exports/q4": {"size": 73_000}}), "--baseline", base).exit_code == 0
    r = invoke("check", tmp_path / "build2", "--baseline", base, "--size-tolerance", "0.01")
    assert r.exit_code == 1


def test_missing_artifact_fails(baseline, tmp_path):
    _, base = baseline
    r, res = check_json(rebuild(tmp_path, **{"exports/q8": None}), base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q8", "artifact")]
    assert error_line(r) == failed_line(base, 18, "exports/q8 artifact")
    assert "FAIL exports/q8 artifact: missing from the build" in r.stderr


def test_newly_invalid_artifact_fails(baseline, tmp_path):
    _, base = baseline
    r, res = check_json(rebuild(tmp_path, **{"exports/q8": {"valid": False}}), base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q8", "valid")]
    assert error_line(r) == failed_line(base, 24, "exports/q8 valid")
    assert "FAIL exports/q8 valid: now marked not valid (a check of the export, such as parity, failed)" in r.stderr


def test_invalid_in_baseline_and_now_is_known_not_failed(tmp_path):
    b = build(tmp_path / "build", **{"exports/q8": {"valid": False}})
    base = tmp_path / "baseline.json"
    ok("check", b, "--baseline", base, "--update")
    r, res = check_json(b, base)
    assert r.exit_code == 0
    assert [row["status"] for row in res["rows"] if row["metric"] == "valid"] == ["pass", "known", "pass"]


def test_broken_target_constraint_fails(baseline, tmp_path):
    _, base = baseline
    # the target's record now has retention under the phone's 0.90 (the metric itself is unchanged)
    b2 = rebuild(tmp_path, **{"exports/q4": {"target_record": target(0.895, 0.07)}})
    r, res = check_json(b2, base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q4", "target phone: min_retention")]
    assert error_line(r) == failed_line(base, 24, "exports/q4 target phone: min_retention")
    assert ("FAIL exports/q4 target phone: min_retention: no longer met (0.895 against limit 0.9: not met)"
            in r.stderr)


def test_target_constraint_no_longer_reported_fails(baseline, tmp_path):
    _, base = baseline
    r, res = check_json(rebuild(tmp_path, **{"exports/q4": {"target_record": None}}), base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q4", "target phone: max_size_mb"), ("exports/q4", "target phone: min_retention"),
                           ("exports/q4", "target phone: parity")]
    assert error_line(r) == failed_line(base, 24, "exports/q4 target phone: max_size_mb",
                                        "exports/q4 target phone: min_retention", "exports/q4 target phone: parity")
    assert "FAIL exports/q4 target phone: max_size_mb: no longer reported (the artifact has no target now)" in r.stderr


def test_speed_only_checked_with_check_speed(baseline, tmp_path):
    _, base = baseline
    b2 = rebuild(tmp_path, **{"exports/q4": {"examples_per_s": 60.0}})  # 37% slower
    r, res = check_json(b2, base)
    assert r.exit_code == 0, r.output
    row = next(x for x in res["rows"] if x["artifact"] == "exports/q4" and x["metric"] == "examples/s")
    assert row["status"] == "not checked" and row["change"] == "-36.8%"
    r, res = check_json(b2, base, "--check-speed")
    assert r.exit_code == 1
    assert failed(res) == [("exports/q4", "examples/s")]
    assert error_line(r) == failed_line(base, 24, "exports/q4 examples/s")
    assert "FAIL exports/q4 examples/s: fell 36.8% (95.0 -> 60.0), more than the 20% allowed" in r.stderr
    assert invoke("check", b2, "--baseline", base, "--check-speed", "--speed-tolerance", "0.4").exit_code == 0


def test_new_artifact_is_reported_not_failed(baseline, tmp_path):
    b, base = baseline
    write_artifact(b / "exports" / "q2", **{**Q4, "quant": "Q2_K", "accuracy": 0.5})
    r, res = check_json(b, base)
    assert r.exit_code == 0, r.output
    new = [row for row in res["rows"] if row["status"] == "new"]
    assert [(x["artifact"], x["metric"]) for x in new] == [("exports/q2", "artifact")]
    assert "1 new" in r.stderr


def test_not_measured_metrics(baseline, tmp_path):
    _, base = baseline
    # retention gone (another eval file): reported, not failed
    r, res = check_json(rebuild(tmp_path, **{"exports/q8": {"retention": None}}), base)
    assert r.exit_code == 0, r.output
    assert [row["status"] for row in res["rows"] if row["metric"] == "retention" and row["artifact"] == "exports/q8"] \
        == ["not measured"]
    # accuracy gone (the export was not evaluated): the build stopped measuring it, a failure
    r, res = check_json(rebuild(tmp_path, **{"exports/q8": {"accuracy": None, "retention": None}}), base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q8", "accuracy")]
    assert "FAIL exports/q8 accuracy: no longer measured (the baseline has it)" in r.stderr


def test_not_in_baseline_is_not_measured(tmp_path):
    b = build(tmp_path / "build", **{"exports/q8": {"accuracy": None, "retention": None}})
    base = tmp_path / "baseline.json"
    ok("check", b, "--baseline", base, "--update")
    r, res = check_json(build(tmp_path / "build2"), base)
    assert r.exit_code == 0, r.output
    rows = {(x["artifact"], x["metric"]): x for x in res["rows"]}
    assert rows[("exports/q8", "accuracy")]["status"] == "not measured"
    assert rows[("exports/q8", "accuracy")]["message"] == "not measured in the baseline"


# --- inputs that changed underneath: files, evaluation file ---------------------------------

def flip_byte(path):
    """One changed byte, same size: only the sha256 can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_changed_file_fails_the_check(baseline, tmp_path):
    _, base = baseline
    b2 = rebuild(tmp_path)
    flip_byte(b2 / "exports" / "q8" / "model-Q8_0.gguf")
    (b2 / "student" / "notes.txt").write_text("x")
    r, res = check_json(b2, base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q8", "files"), ("student", "files")]
    assert error_line(r) == failed_line(base, 24, "exports/q8 files", "student files")
    assert "FAIL exports/q8 files: model-Q8_0.gguf: changed (sha256 differs from the manifest)" in r.stderr
    assert "FAIL student files: notes.txt: not in the manifest" in r.stderr
    rows = {(x["artifact"], x["metric"]): x for x in res["rows"]}
    assert rows[("exports/q4", "files")]["message"] == "1 of 1 files match the manifest"
    assert rows[("exports/q8", "files")]["now"] == ["model-Q8_0.gguf: changed (sha256 differs from the manifest)"]
    # --no-verify: the files are not checked, the figures compare as before
    r, res = check_json(b2, base, "--no-verify")
    assert r.exit_code == 0, r.output
    assert {x["status"] for x in res["rows"] if x["metric"] == "files"} == {"not checked"}
    assert "6 not checked" in r.stderr  # files, and examples/s without --check-speed


def test_changed_file_in_a_new_artifact_fails(baseline, tmp_path):
    b, base = baseline
    write_artifact(b / "exports" / "q2", **{**Q4, "quant": "Q2_K"})
    (b / "exports" / "q2" / "model-Q2_K.gguf").unlink()
    r, res = check_json(b, base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q2", "files")]
    assert "FAIL exports/q2 files: model-Q2_K.gguf: missing" in r.stderr


def test_update_refuses_a_changed_build(baseline, tmp_path):
    _, base = baseline
    before = base.read_text()
    b2 = rebuild(tmp_path, **{"exports/q8": {"accuracy": 0.5}})
    flip_byte(b2 / "exports" / "q8" / "model-Q8_0.gguf")
    r = invoke("check", b2, "--baseline", base, "--update")
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [
        f"Error: {b2 / 'exports' / 'q8'}: model-Q8_0.gguf: changed (sha256 differs from the manifest); "
        f"rebuild it, or pass --no-verify to skip this check"]
    assert base.read_text() == before
    r = ok("check", b2, "--baseline", base, "--update", "--no-verify")
    assert "~ exports/q8: accuracy 89.0% -> 50.0%" in r.stderr


def test_a_score_of_another_metric_fails(baseline, tmp_path):
    _, base = baseline
    data = json.loads(base.read_text())
    data["artifacts"]["exports/q8"]["metric"] = "chrf"
    base.write_text(json.dumps(data))
    b2 = rebuild(tmp_path, **{"exports/q8": {"metric": "exact"}})
    r, res = check_json(b2, base)
    assert r.exit_code == 1
    assert failed(res) == [("exports/q8", "eval file")]
    assert ("FAIL exports/q8 eval file: scored by another metric than the baseline's (chrf in the baseline, exact "
            "now); score with --metric chrf, or write the baseline again with --update") in r.stderr
    rows = {x["metric"]: x for x in res["rows"] if x["artifact"] == "exports/q8"}
    assert rows["accuracy"]["message"] == "not compared (scored by another metric)"


def test_accuracy_on_another_eval_file_fails(baseline, tmp_path):
    _, base = baseline
    other = "c" * 64
    # better figures, but on another file: not compared, a failure
    b2 = rebuild(tmp_path, **{"exports/q8": {"eval_data_sha256": other, "accuracy": 0.99, "examples_per_s": 1.0}})
    r, res = check_json(b2, base, "--check-speed")
    assert r.exit_code == 1
    assert failed(res) == [("exports/q8", "eval file")]
    assert error_line(r) == failed_line(base, 24, "exports/q8 eval file")
    assert ("FAIL exports/q8 eval file: accuracy measured on another evaluation file than the baseline's "
            f"(sha256 {EVAL_SHA[:12]} in the baseline, cccccccccccc now); evaluate on the baseline's file, "
            "or write the baseline again with --update") in r.stderr
    rows = {(x["artifact"], x["metric"]): x for x in res["rows"] if x["artifact"] == "exports/q8"}
    for metric in ("accuracy", "retention", "examples/s"):
        assert rows[("exports/q8", metric)]["status"] == "not checked"
        assert rows[("exports/q8", metric)]["message"] == "not compared (measured on another evaluation file)"
    assert rows[("exports/q8", "eval file")]["baseline"] == EVAL_SHA
    assert rows[("exports/q8", "eval file")]["now"] == other
    # --update records the new file; the same file then compares
    r = ok("check", b2, "--baseline", base, "--update")
    assert f"~ exports/q8: eval file {EVAL_SHA[:12]} -> cccccccccccc" in r.stderr
    assert json.loads(base.read_text())["artifacts"]["exports/q8"]["eval_data_sha256"] == other
    ok("check", b2, "--baseline", base)


def test_old_baseline_without_eval_file_is_a_warning(baseline, tmp_path):
    b, base = baseline
    old = json.loads(base.read_text())
    for entry in old["artifacts"].values():
        del entry["eval_data_sha256"]  # written before shrink recorded it
    base.write_text(json.dumps(old))
    r, res = check_json(b, base)
    assert r.exit_code == 0, r.output
    rows = [x for x in res["rows"] if x["metric"] == "eval file"]
    assert [x["status"] for x in rows] == ["not measured"] * 3
    assert rows[0]["message"] == ("not recorded in the baseline (written before shrink recorded it; --update "
                                  "records it): accuracy compared as if measured on the same file")
    # the accuracy is still compared
    r, res = check_json(rebuild(tmp_path, **{"exports/q8": {"accuracy": 0.85}}), base)
    assert r.exit_code == 1 and failed(res) == [("exports/q8", "accuracy")]


# --- --update, outputs ------------------------------------------------------------------------

def test_update_round_trip_prints_changes(baseline, tmp_path):
    _, base = baseline
    b2 = rebuild(tmp_path, **{"exports/q8": None, "exports/q4": {"accuracy": 0.80}})
    write_artifact(b2 / "exports" / "q5", **{**Q4, "quant": "Q5_K_M"})
    assert invoke("check", b2, "--baseline", base).exit_code == 1
    r = ok("check", b2, "--baseline", base, "--update")
    assert "~ exports/q4: accuracy 87.0% -> 80.0%" in r.stderr
    assert "- exports/q8: removed" in r.stderr
    assert "+ exports/q5: added (export gguf Q5_K_M, 70.0 KB, 87.0%)" in r.stderr
    assert f"baseline {base} written: 3 artifacts" in r.stderr
    assert sorted(json.loads(base.read_text())["artifacts"]) == ["exports/q4", "exports/q5", "student"]
    ok("check", b2, "--baseline", base)
    r = ok("check", b2, "--baseline", base, "--update", "--json")
    assert json.loads(r.stdout) == json.loads(base.read_text())
    assert "no change" in r.stderr


def test_update_refuses_check_options(baseline):
    b, base = baseline
    r = invoke("check", b, "--baseline", base, "--update", "--junit", base.parent / "x.xml")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "Error: --update writes the baseline and checks nothing: leave out --junit and --check-speed"]


def test_junit_xml(baseline, tmp_path):
    _, base = baseline
    b2 = rebuild(tmp_path, **{"exports/q8": {"accuracy": 0.80, "size": 200_000}, "student": None})
    xml = tmp_path / "check.xml"
    r = invoke("check", b2, "--baseline", base, "--junit", xml)
    assert r.exit_code == 1
    root = ET.parse(xml).getroot()
    suites = root.findall("testsuite")
    assert len(suites) == 1 and suites[0].get("name") == "shrink check"
    cases = suites[0].findall("testcase")
    assert len(cases) == int(suites[0].get("tests")) == 1 + 2 * 7 + 3  # student missing; q8, q4 with 3 constraints
    fails = [(c.get("classname"), c.get("name"), c.find("failure").get("message")) for c in cases
             if c.find("failure") is not None]
    assert int(suites[0].get("failures")) == len(fails) == 3
    assert [f[:2] for f in fails] == [("exports/q8", "accuracy"), ("exports/q8", "size"), ("student", "artifact")]
    assert fails[0][2] == "exports/q8 accuracy: fell 9.0 pts (89.0% -> 80.0%), more than the 1.0 pts allowed"
    assert int(suites[0].get("skipped")) == 2  # examples/s not checked


def test_github_step_summary(baseline, tmp_path, monkeypatch):
    _, base = baseline
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    r = invoke("check", rebuild(tmp_path, **{"exports/q4": {"size": 90_000}}), "--baseline", base)
    assert r.exit_code == 1
    text = summary.read_text()
    assert text.startswith("earlier step\n## shrink check: failed\n")  # appended, not replaced
    lines = text.splitlines()
    assert "| artifact | metric | baseline | now | change | result |" in lines
    assert "|---|---|---|---|---|---|" in lines
    assert "| exports/q4 | size | 70.0 KB | 90.0 KB | +28.6% | **FAIL** |" in lines
    assert "**Verdict: failed.** 1 of 24 checks failed." in lines
    assert "- exports/q4 size: grew 28.6% (70.0 KB -> 90.0 KB), more than the 5% allowed" in lines


def test_json_output(baseline):
    b, base = baseline
    r, res = check_json(b, base)
    assert set(res) == {"verdict", "build_dir", "baseline", "tolerances", "counts", "rows"}
    assert res["tolerances"] == {"accuracy": 0.01, "retention": 0.01, "size": 0.05, "speed": 0.2, "check_speed": False}
    row = res["rows"][0]
    assert set(row) == {"artifact", "metric", "baseline", "now", "change", "status", "message"}
    assert sum(res["counts"].values()) == len(res["rows"]) == 3 * 7 + 3


# --- bad input: exit 2, one line naming the file ------------------------------------------

BAD_BASELINES = {
    "not json": ("{oops",
                 "not a JSON file (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    "not utf-8": (b"\xff\xfe{",
                  "not a JSON file ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte)"),
    "a list": ("[]", "not a shrink baseline (\"kind\": 'shrink-baseline' missing)"),
    "wrong kind": ('{"kind": "other", "version": 1, "artifacts": {}}',
                   "not a shrink baseline (\"kind\": 'shrink-baseline' missing)"),
    "wrong version": ('{"kind": "shrink-baseline", "version": 7, "artifacts": {}}',
                      f"version 7, this shrink ({__version__}) reads version 1; write it again with --update"),
    "artifacts a list": ('{"kind": "shrink-baseline", "version": 1, "artifacts": []}',
                         "\"artifacts\" must be an object keyed by artifact path"),
    "no artifacts": ('{"kind": "shrink-baseline", "version": 1, "artifacts": {}}',
                     "lists no artifacts; write it from a build with --update"),
    "entry a number": ('{"kind": "shrink-baseline", "version": 1, "artifacts": {"a": 3}}',
                       "artifacts['a'] must be an object"),
    "accuracy a string": ('{"kind": "shrink-baseline", "version": 1, "artifacts": {"a": {"accuracy": "high"}}}',
                          "artifacts['a'].accuracy must be a number or null, not 'high'"),
    "unknown key": ('{"kind": "shrink-baseline", "version": 1, "artifacts": {"a": {"acuracy": 0.9}}}',
                    "artifacts['a']: unknown key 'acuracy'"),
    "eval file a number": ('{"kind": "shrink-baseline", "version": 1, "artifacts": {"a": {"eval_data_sha256": 7}}}',
                           "artifacts['a'].eval_data_sha256 must be a string or null, not 7"),
    "bad target": ('{"kind": "shrink-baseline", "version": 1, "artifacts": {"a": {"target": {"name": "phone", '
                   '"constraints": {"max_size_mb": {"met": "yes"}}}}}}',
                   "artifacts['a'].target.constraints['max_size_mb'] must be an object with \"met\": true or false"),
}


@pytest.mark.parametrize("case", sorted(BAD_BASELINES))
def test_bad_baseline_is_a_user_error(baseline, tmp_path, case):
    b, _ = baseline
    content, message = BAD_BASELINES[case]
    bad = tmp_path / "bad.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = invoke("check", b, "--baseline", bad)
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines() == [f"Error: baseline {bad}: {message}"]
    assert "Traceback" not in r.output


def test_missing_baseline_says_to_update(baseline, tmp_path):
    b, _ = baseline
    r = invoke("check", b, "--baseline", tmp_path / "none.json")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        f"Error: baseline {tmp_path / 'none.json'} does not exist; create it from a good build with "
        f"`shrink check BUILD_DIR --baseline {tmp_path / 'none.json'} --update` first"]


def test_build_without_artifacts_is_a_user_error(baseline, tmp_path):
    _, base = baseline
    empty = tmp_path / "empty"
    (empty / ".q4.partial").mkdir(parents=True)  # an interrupted write is not an artifact
    write_artifact(empty / ".q4.partial" / "x", **Q4)
    (empty / "other").mkdir()
    (empty / "other" / "manifest.json").write_text('{"name": "another tool"}')
    no_artifacts = f"Error: build folder {empty} holds no shrink artifacts (no manifest.json found)"
    for args, line in ((("check", empty, "--baseline", base), no_artifacts),
                       (("check", empty, "--baseline", base, "--update"), no_artifacts),
                       (("check", tmp_path / "nope", "--baseline", base),
                        f"Error: build folder {tmp_path / 'nope'} does not exist")):
        r = invoke(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert r.stderr.strip().splitlines() == [line]
    assert json.loads(base.read_text())["artifacts"]  # the failed --update left the baseline alone


def test_corrupt_manifest_in_build_is_a_user_error(baseline, tmp_path):
    _, base = baseline
    b2 = rebuild(tmp_path)
    (b2 / "student" / "manifest.json").write_text('{"magic": "shrink-artifact", "schema_version": 9}')
    r = invoke("check", b2, "--baseline", base)
    assert r.exit_code == 2 and "manifest schema version 9" in error_line(r)


def test_compare_is_pure(tmp_path):
    """compare() on manifests in memory alone: the tolerance boundary, and a baseline
    constraint not met that is still not met."""
    manifests = {"q4": Manifest(kind="export", format="gguf", settings={"quant": "Q4_K_M"}, valid=True,
                                metrics={"size_bytes": 1050, "accuracy": 0.80, "retention": 0.85},
                                target=target(0.85, 0.001))}
    base = gate.build_baseline(manifests)
    base["artifacts"]["q4"].update(size_bytes=1000, accuracy=0.81)
    rows = gate.compare(base, manifests, gate.Tolerances(), problems={"q4": []})
    status = {r.metric: r.status for r in rows}
    assert status == {"files": "pass", "eval file": "not measured", "accuracy": "pass", "retention": "pass",
                      "size": "pass", "examples/s": "not measured", "valid": "pass", "target phone: max_size_mb": "pass", "target phone: min_retention": "known",
                      "target phone: parity": "pass"}
    assert base["artifacts"]["q4"]["target"] == {k: v for k, v in target(0.85, 0.001).items() if k in
                                                 ("name", "constraints", "met")}
    assert gate.fmt_value("target phone: parity", target(0.85, 0.001)["constraints"]["parity"]) == "0.97: met (passed)"
