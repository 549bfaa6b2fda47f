"""The CI gate: a build's artifacts against a committed baseline.

`shrink check` reads the manifest of every artifact under a build folder, re-hashes
its files against the manifest, and compares accuracy, retention, size, examples/s,
validity and device-target constraints with a baseline file the user commits. A
changed file, figures measured on another evaluation file than the baseline's, or a
regression beyond the tolerances fails the check (exit code 1). Only read_baseline,
check_build, update_baseline and print_rows read, write or print (the build's manifests
come from shrink.artifact.collect_artifacts); the rest are pure (manifests and dicts in,
rows and text out).

The baseline file:

    {"kind": "shrink-baseline", "version": 1, "shrink_version": "0.1.0",
     "artifacts": {"student-q4": {"kind": "export", "format": "gguf", "quant": "Q4_K_M",
                                  "accuracy": 0.87, "retention": 0.922,
                                  "size_bytes": 16900000, "examples_per_s": 41.3,
                                  "eval_data_sha256": "9f86d0...", "valid": true,
                                  "target": null}}}

Artifacts are keyed by their folder's path relative to the build folder (posix form).
`eval_data_sha256` identifies the evaluation file accuracy was measured on (null when
not evaluated, or in a baseline written before shrink recorded it).
`target` is null, or for an artifact built for a device target, the name, constraints
and verdict of its manifest's `target` section: {"name": "phone", "constraints":
{"max_size_mb": {"limit": 600, "value": 16.9, "met": true}, ...}, "met": true}.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shrink import __version__, artifact
from shrink.atomic import write_json_atomic, write_text_atomic
from shrink.errors import ShrinkError
from shrink.manifest import Manifest
from shrink.tables import human_bytes, pct

BASELINE_KIND = "shrink-baseline"
BASELINE_VERSION = 1

# Per-artifact fields of a baseline entry and the JSON types each may hold.
NUMBER_FIELDS = ("accuracy", "retention", "size_bytes", "examples_per_s")
ENTRY_FIELDS = ("kind", "format", "quant", "metric", *NUMBER_FIELDS, "eval_data_sha256", "valid", "target")
# field -> row metric
METRIC_NAMES = {"size_bytes": "size", "examples_per_s": "examples/s", "eval_data_sha256": "eval file"}
TOP_FIELDS = {"kind", "version", "shrink_version", "artifacts"}

# Row statuses. Only FAIL fails the check.
PASS = "pass"
FAIL = "fail"
NEW = "new"  # an artifact or target constraint the baseline does not have
NOT_MEASURED = "not measured"  # a metric missing on one side
# not compared: examples/s without --check-speed, files with --no-verify, figures from another eval file
NOT_CHECKED = "not checked"
KNOWN = "known"  # a failure the baseline already had (not valid, constraint not met)

EPS = 1e-9  # float noise: a drop of exactly the tolerance passes


class CheckFailed(ShrinkError):
    """The build regressed against the baseline. Exit code 1: a failed check, not a
    user error."""

    exit_code = 1


@dataclass(frozen=True)
class Tolerances:
    accuracy: float = 0.01  # largest accuracy drop allowed, absolute (0.01 = 1 point)
    retention: float = 0.01  # largest retention drop allowed, absolute
    size: float = 0.05  # largest size growth allowed, relative (0.05 = 5%)
    speed: float = 0.20  # largest examples/s slowdown allowed, relative
    check_speed: bool = False  # compare examples/s at all (CI machines are noisy)


@dataclass(frozen=True)
class Row:
    artifact: str  # path relative to the build folder
    metric: str  # files, eval file, accuracy, retention, size, examples/s, valid, artifact, "target NAME: CONSTRAINT"
    baseline: Any  # the raw baseline value (None when absent)
    now: Any  # the raw value in this build (None when absent)
    change: str  # human-readable difference, "" when none applies
    status: str  # PASS, FAIL, NEW, NOT_MEASURED, NOT_CHECKED or KNOWN
    message: str  # one line: why this status, read after "ARTIFACT METRIC: "

    @property
    def text(self) -> str:
        return f"{self.artifact} {self.metric}: {self.message}"


@dataclass
class CheckResult:
    build_dir: str
    baseline: str
    tolerances: Tolerances
    rows: list[Row] = field(default_factory=list)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.status == FAIL]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        return {
            "verdict": "pass" if self.passed else "fail",
            "build_dir": self.build_dir,
            "baseline": self.baseline,
            "tolerances": asdict(self.tolerances),
            "counts": counts,
            "rows": [asdict(r) for r in self.rows],
        }


# ---------------------------------------------------------------------------------------
# Reading the build and the baseline


def baseline_entry(manifest: Manifest) -> dict[str, Any]:
    """What the baseline keeps of one artifact's manifest."""
    m = manifest.metrics
    return {
        "kind": manifest.kind,
        "format": manifest.format,
        "quant": artifact.quant_label(manifest),
        "metric": m.get("metric"),  # what accuracy is: choice, exact, f1, chrf, rouge-l or json
        "accuracy": m.get("accuracy"),
        "retention": m.get("retention"),
        "size_bytes": m.get("size_bytes"),
        "examples_per_s": m.get("examples_per_s"),
        "eval_data_sha256": m.get("eval_data_sha256"),
        "valid": manifest.valid,
        "target": _target_summary(manifest.target),
    }


def _target_summary(target: Any) -> dict[str, Any] | None:
    """What the baseline keeps of a manifest's device target: its name, each constraint
    ({limit, value, met}, and a note when there is one) and whether all were met."""
    if not isinstance(target, dict):
        return None
    return {"name": target.get("name"), "constraints": target.get("constraints") or {}, "met": target.get("met")}


def build_baseline(manifests: dict[str, Manifest]) -> dict[str, Any]:
    """The baseline file's contents for a build."""
    return {
        "kind": BASELINE_KIND,
        "version": BASELINE_VERSION,
        "shrink_version": __version__,
        "artifacts": {key: baseline_entry(manifests[key]) for key in sorted(manifests)},
    }


def read_baseline(path: str | Path) -> dict[str, Any]:
    """Read and validate a baseline file; anything wrong is a one-line ShrinkError naming it."""
    path = Path(path)
    if path.is_dir():
        raise ShrinkError(f"baseline {path} is a folder, not a baseline file")
    if not path.is_file():
        raise ShrinkError(
            f"baseline {path} does not exist; create it from a good build with "
            f"`shrink check BUILD_DIR --baseline {path} --update` first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShrinkError(f"baseline {path}: not a JSON file ({e})") from None
    except OSError as e:
        raise ShrinkError(f"baseline {path}: cannot be read ({e.strerror or e})") from None
    validate_baseline(data, str(path))
    return data


def validate_baseline(data: Any, name: str) -> None:
    def bad(msg: str) -> ShrinkError:
        return ShrinkError(f"baseline {name}: {msg}")

    if not isinstance(data, dict) or data.get("kind") != BASELINE_KIND:
        raise bad(f"not a shrink baseline (\"kind\": {BASELINE_KIND!r} missing)")
    if data.get("version") != BASELINE_VERSION:
        raise bad(f"version {data.get('version')!r}, this shrink ({__version__}) reads version "
                  f"{BASELINE_VERSION}; write it again with --update")
    unknown = sorted(set(data) - TOP_FIELDS)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}")
    arts = data.get("artifacts")
    if not isinstance(arts, dict):
        raise bad("\"artifacts\" must be an object keyed by artifact path")
    if not arts:
        raise bad("lists no artifacts; write it from a build with --update")
    for key, entry in arts.items():
        where = f"artifacts[{key!r}]"
        if not isinstance(entry, dict):
            raise bad(f"{where} must be an object")
        unknown = sorted(set(entry) - set(ENTRY_FIELDS))
        if unknown:
            raise bad(f"{where}: unknown key {unknown[0]!r}")
        for f in NUMBER_FIELDS:
            v = entry.get(f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise bad(f"{where}.{f} must be a number or null, not {v!r}")
        if entry.get("metric") is not None and not isinstance(entry["metric"], str):
            raise bad(f"{where}.metric must be a string or null, not {entry['metric']!r}")
        sha = entry.get("eval_data_sha256")
        if sha is not None and not isinstance(sha, str):
            raise bad(f"{where}.eval_data_sha256 must be a string or null, not {sha!r}")
        if not isinstance(entry.get("valid", True), bool):
            raise bad(f"{where}.valid must be true or false")
        target = entry.get("target")
        if target is None:
            continue
        if not isinstance(target, dict) or not isinstance(target.get("name"), str):
            raise bad(f"{where}.target must be null or an object with a \"name\"")
        constraints = target.get("constraints", {})
        if not isinstance(constraints, dict):
            raise bad(f"{where}.target.constraints must be an object")
        for cname, c in constraints.items():
            if not isinstance(c, dict) or not isinstance(c.get("met"), bool):
                raise bad(f"{where}.target.constraints[{cname!r}] must be an object with \"met\": true or false")


# ---------------------------------------------------------------------------------------
# Comparing


def compare(baseline: dict[str, Any], manifests: dict[str, Manifest], tol: Tolerances,
            problems: dict[str, list[str]] | None = None) -> list[Row]:
    """One row per artifact and metric: baseline artifacts in order, then new ones.
    `problems`: each artifact's files that differ from its manifest (artifact.verify);
    None when they were not verified (--no-verify)."""
    rows: list[Row] = []
    base = baseline["artifacts"]
    for key in sorted(base):
        if key not in manifests:
            rows.append(Row(key, "artifact", _describe(base[key]), None, "", FAIL, "missing from the build"))
            continue
        rows.append(_files_row(key, manifests[key], problems))
        rows += _compare_artifact(key, base[key], baseline_entry(manifests[key]), tol)
    for key in sorted(set(manifests) - set(base)):
        rows.append(Row(key, "artifact", None, _describe(baseline_entry(manifests[key])), "", NEW,
                        "new: not in the baseline (not checked)"))
        rows.append(_files_row(key, manifests[key], problems))
    return rows


def _compare_artifact(key: str, b: dict, n: dict, tol: Tolerances) -> list[Row]:
    eval_row = _eval_file_row(key, b, n)
    if eval_row.status == FAIL:  # figures from two evaluation files say nothing about each other
        accuracy, retention, speed = (_not_compared(key, f, b, n) for f in ("accuracy", "retention", "examples_per_s"))
    else:
        accuracy = _drop_row(key, "accuracy", b.get("accuracy"), n.get("accuracy"), tol.accuracy, missing_fails=True)
        retention = _drop_row(key, "retention", b.get("retention"), n.get("retention"), tol.retention,
                              missing_fails=False)
        speed = _speed_row(key, b.get("examples_per_s"), n.get("examples_per_s"), tol)
    rows = [eval_row, accuracy, retention, _size_row(key, b.get("size_bytes"), n.get("size_bytes"), tol.size), speed,
            _valid_row(key, b.get("valid", True), n["valid"])]
    return rows + _target_rows(key, b.get("target"), n.get("target"))


def _not_compared(key: str, f: str, b: dict, n: dict) -> Row:
    other = "scored by another metric" if b.get("metric") and n.get("metric") and b["metric"] != n["metric"] \
        else "measured on another evaluation file"
    return Row(key, METRIC_NAMES.get(f, f), b.get(f), n.get(f), "", NOT_CHECKED, f"not compared ({other})")


def _files_row(key: str, manifest: Manifest, problems: dict[str, list[str]] | None) -> Row:
    """The artifact's files against its manifest's sha256: after a change, the manifest's
    figures are no longer those of the files in the folder."""
    if problems is None:
        return Row(key, "files", None, None, "", NOT_CHECKED, "not checked (--no-verify)")
    found = problems[key]
    if found:
        return Row(key, "files", None, found, "", FAIL, "; ".join(found))
    n = len(manifest.files)
    return Row(key, "files", None, found, "", PASS, f"{n} of {n} files match the manifest")


def _eval_file_row(key: str, b: dict, n: dict) -> Row:
    """Accuracy, retention and examples/s compare only when measured on the same
    evaluation file. A side that did not record its file (a baseline written before
    shrink did) is a warning: the figures are compared as they are."""
    b_sha, n_sha = b.get("eval_data_sha256"), n.get("eval_data_sha256")
    if b.get("metric") and n.get("metric") and b["metric"] != n["metric"]:
        return Row(key, "eval file", b.get("metric"), n.get("metric"), "", FAIL,
                   f"scored by another metric than the baseline's ({b['metric']} in the baseline, {n['metric']} "
                   f"now); score with --metric {b['metric']}, or write the baseline again with --update")
    if b_sha and n_sha:
        if b_sha != n_sha:
            return Row(key, "eval file", b_sha, n_sha, "", FAIL,
                       f"accuracy measured on another evaluation file than the baseline's (sha256 {b_sha[:12]} "
                       f"in the baseline, {n_sha[:12]} now); evaluate on the baseline's file, or write the "
                       f"baseline again with --update")
        return Row(key, "eval file", b_sha, n_sha, "", PASS, "the same as the baseline's")
    if b.get("accuracy") is None or n.get("accuracy") is None:
        return Row(key, "eval file", b_sha, n_sha, "", NOT_MEASURED, "no accuracy to compare")
    side = "in the baseline (written before shrink recorded it; --update records it)" if not b_sha \
        else "in the artifact's manifest"
    return Row(key, "eval file", b_sha, n_sha, "", NOT_MEASURED,
               f"not recorded {side}: accuracy compared as if measured on the same file")


def _drop_row(key, metric, b, n, tol, missing_fails: bool) -> Row:
    """Accuracy or retention: fails when it fell by more than `tol` (absolute)."""
    if b is None or n is None:
        if b is not None and missing_fails:
            return Row(key, metric, b, n, "", FAIL, "no longer measured (the baseline has it)")
        side = "in the baseline" if b is None else "now"
        return Row(key, metric, b, n, "", NOT_MEASURED, f"not measured {side}")
    diff = n - b
    change = f"{_signed(100 * diff)} pts"
    if -diff > tol + EPS:
        return Row(key, metric, b, n, change, FAIL,
                   f"fell {100 * -diff:.1f} pts ({pct(b)} -> {pct(n)}), more than the {100 * tol:.1f} pts allowed")
    return Row(key, metric, b, n, change, PASS, f"within {100 * tol:.1f} pts")


def _size_row(key, b, n, tol) -> Row:
    """Size: fails when it grew by more than `tol` (relative)."""
    if b is None or n is None:
        return Row(key, "size", b, n, "", NOT_MEASURED, "not measured " + ("in the baseline" if b is None else "now"))
    growth = n / b - 1 if b else (0.0 if n == 0 else math.inf)
    change = f"{_signed(100 * growth)}%"
    if growth > tol + EPS:
        return Row(key, "size", b, n, change, FAIL,
                   f"grew {100 * growth:.1f}% ({human_bytes(b)} -> {human_bytes(n)}), more than the "
                   f"{100 * tol:.0f}% allowed")
    return Row(key, "size", b, n, change, PASS, f"within +{100 * tol:.0f}%")


def _speed_row(key, b, n, tol: Tolerances) -> Row:
    """examples/s: fails when it slowed by more than `tol.speed` (relative), and only with
    check_speed."""
    if b is None or n is None:
        return Row(key, "examples/s", b, n, "", NOT_MEASURED,
                   "not measured " + ("in the baseline" if b is None else "now"))
    slowdown = 1 - n / b if b else 0.0
    change = f"{_signed(-100 * slowdown)}%"
    if not tol.check_speed:
        return Row(key, "examples/s", b, n, change, NOT_CHECKED, "not checked (use --check-speed)")
    if slowdown > tol.speed + EPS:
        return Row(key, "examples/s", b, n, change, FAIL,
                   f"fell {100 * slowdown:.1f}% ({b:.1f} -> {n:.1f}), more than the "
                   f"{100 * tol.speed:.0f}% allowed")
    return Row(key, "examples/s", b, n, change, PASS, f"within -{100 * tol.speed:.0f}%")


def _valid_row(key, b: bool, n: bool) -> Row:
    if b and not n:
        return Row(key, "valid", b, n, "", FAIL, "now marked not valid (a check of the export, such as parity, failed)")
    if not b and not n:
        return Row(key, "valid", b, n, "", KNOWN, "not valid, as in the baseline")
    return Row(key, "valid", b, n, "", PASS, "valid again" if not b else "valid")


def _constraints(target: Any) -> dict[tuple[str, str], dict]:
    """A target's constraints keyed by (target name, constraint name)."""
    if not isinstance(target, dict) or not isinstance(target.get("constraints"), dict):
        return {}
    name = str(target.get("name"))
    return {(name, c): v for c, v in target["constraints"].items() if isinstance(v, dict)}


def _target_rows(key, b_target, n_target) -> list[Row]:
    """A constraint met in the baseline must still be met (and still be reported)."""
    base, now = _constraints(b_target), _constraints(n_target)
    rows = []
    for tc in sorted(base.keys() | now.keys()):
        metric = f"target {tc[0]}: {tc[1]}"
        b, n = base.get(tc), now.get(tc)
        if b is None:
            rows.append(Row(key, metric, None, n, "", NEW, "constraint not in the baseline"))
        elif n is None:
            what = f"the artifact's target is now {n_target['name']!r}" if isinstance(n_target, dict) \
                else "the artifact has no target now"
            status = FAIL if b.get("met") else KNOWN
            rows.append(Row(key, metric, b, None, "", status, f"no longer reported ({what})"))
        elif b.get("met") and not n.get("met"):
            rows.append(Row(key, metric, b, n, "", FAIL,
                            f"no longer met ({_constraint_text(n)})"))
        elif not n.get("met"):
            rows.append(Row(key, metric, b, n, "", KNOWN, "not met, as in the baseline"))
        else:
            rows.append(Row(key, metric, b, n, "", PASS, "met again" if not b.get("met") else "met"))
    return rows


def _signed(x: float) -> str:
    """'+1.5', '-2.0', and '+0.0' rather than '-0.0'."""
    return f"{round(x, 1) + 0.0:+.1f}"


def _constraint_text(c: dict) -> str:
    """'16.9 against limit 600: met'; a limit that is not a number (parity's thresholds)
    is left out, and a note is added when there is one."""
    value, limit, note = c.get("value"), c.get("limit"), c.get("note")
    text = "not measured" if value is None else _num(value)
    if isinstance(limit, (int, float)) and not isinstance(limit, bool):
        text += f" against limit {_num(limit)}"
    text += ": met" if c.get("met") else ": not met"
    return text + (f" ({note})" if note else "")


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _describe(entry: dict) -> str:
    """An artifact in a few words: 'export gguf Q4_K_M, 16.9 MB, 87.0%'."""
    head = " ".join(str(x) for x in (entry.get("kind"), entry.get("format"), entry.get("quant")) if x)
    return f"{head}, {human_bytes(entry.get('size_bytes'))}, {pct(entry.get('accuracy'))}"


# ---------------------------------------------------------------------------------------
# Rendering


def fmt_value(metric: str, v: Any) -> str:
    """A baseline or current value as a table cell."""
    if v is None:
        return "-"
    if metric in ("accuracy", "retention"):
        return pct(v)
    if metric == "size":
        return human_bytes(v)
    if metric == "examples/s":
        return f"{v:,.1f}"
    if metric == "valid":
        return "yes" if v else "no"
    if metric == "files":
        return "match" if not v else f"{len(v)} problem(s)"
    if metric == "eval file":
        return v[:12]  # of the sha256
    if metric.startswith("target ") and isinstance(v, dict):
        return _constraint_text(v)
    return str(v)


def summary_line(result: CheckResult) -> str:
    """One line: the verdict and the counts, or every failed check by artifact and metric."""
    rows, failures = result.rows, result.failures
    counts = [f"{len(rows)} checks"]
    for status in (NEW, NOT_MEASURED, NOT_CHECKED, KNOWN):
        n = sum(r.status == status for r in rows)
        if n:
            counts.append(f"{n} {status}")
    if not failures:
        return f"check passed against {result.baseline}: " + ", ".join(counts)
    names = ", ".join(f"{r.artifact} {r.metric}" for r in failures)
    return f"check failed against {result.baseline}: {len(failures)} of {len(rows)} checks failed ({names})"


def render_junit(result: CheckResult) -> str:
    """JUnit XML: one testsuite, one testcase per artifact and metric."""
    failures = len(result.failures)
    skipped = sum(r.status not in (PASS, FAIL) for r in result.rows)
    attrs = {"name": "shrink check", "tests": str(len(result.rows)), "failures": str(failures),
             "errors": "0", "skipped": str(skipped)}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", attrs)
    for r in result.rows:
        case = ET.SubElement(suite, "testcase", {"classname": r.artifact, "name": r.metric})
        detail = f"baseline {fmt_value(r.metric, r.baseline)}, now {fmt_value(r.metric, r.now)}"
        if r.status == FAIL:
            ET.SubElement(case, "failure", {"message": r.text,
                                            "type": "regression"}).text = detail
        elif r.status != PASS:
            ET.SubElement(case, "skipped", {"message": f"{r.status}: {r.message}"})
        else:
            ET.SubElement(case, "system-out").text = detail
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def render_markdown(result: CheckResult) -> str:
    """A Markdown summary (for $GITHUB_STEP_SUMMARY): heading, table, verdict."""
    mark = {PASS: "pass", FAIL: "**FAIL**", NEW: "new", NOT_MEASURED: "not measured",
            NOT_CHECKED: "not checked", KNOWN: "known"}
    verdict = "passed" if result.passed else "failed"
    lines = [f"## shrink check: {verdict}", "",
             "| artifact | metric | baseline | now | change | result |", "|---|---|---|---|---|---|"]
    for r in result.rows:
        cells = [r.artifact, r.metric, fmt_value(r.metric, r.baseline), fmt_value(r.metric, r.now), r.change,
                 mark[r.status]]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    lines += ["", f"**Verdict: {verdict}.** {len(result.failures)} of {len(result.rows)} checks failed."
              if result.failures else f"**Verdict: {verdict}.** {_md_cell(summary_line(result))}", ""]
    lines += [f"- {_md_cell(r.text)}" for r in result.failures]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def print_rows(result: CheckResult) -> None:
    """The rich table on stderr, then the summary line."""
    from rich.markup import escape
    from rich.table import Table

    from shrink.console import console

    style = {PASS: "green", FAIL: "bold red", NEW: "cyan", NOT_MEASURED: "dim", NOT_CHECKED: "dim", KNOWN: "yellow"}
    table = Table(title=escape(f"shrink check: {result.build_dir} against {result.baseline}"))
    for col in ("artifact", "metric", "baseline", "now", "change", "result"):
        table.add_column(col, justify="right" if col in ("baseline", "now", "change") else "left")
    for r in result.rows:
        cells = (r.artifact, r.metric, fmt_value(r.metric, r.baseline), fmt_value(r.metric, r.now), r.change)
        table.add_row(*map(escape, cells), f"[{style[r.status]}]{r.status}[/]")
    console.print(table)
    for r in result.failures:
        console.print(f"[bold red]FAIL[/] {escape(r.text)}", highlight=False, soft_wrap=True)
    if result.passed:  # a failure's summary is the command's `Error: ...` line
        console.print(f"[green]{escape(summary_line(result))}[/]", highlight=False, soft_wrap=True)


def baseline_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What --update changes, one line per artifact field: '~ q4: accuracy 87.0% -> 88.0%'."""
    old_arts = (old or {}).get("artifacts", {})
    lines = []
    for key in sorted(old_arts.keys() | new["artifacts"].keys()):
        a, b = old_arts.get(key), new["artifacts"].get(key)
        if a is None:
            lines.append(f"+ {key}: added ({_describe(b)})")
        elif b is None:
            lines.append(f"- {key}: removed")
        else:
            for f in ENTRY_FIELDS:
                if f == "target":
                    lines += _target_changes(key, a.get(f), b.get(f))
                elif a.get(f) != b.get(f):
                    name = METRIC_NAMES.get(f, f)
                    lines.append(f"~ {key}: {name} {fmt_value(name, a.get(f))} -> {fmt_value(name, b.get(f))}")
    return lines


def _target_changes(key: str, a: Any, b: Any) -> list[str]:
    ca, cb = _constraints(a), _constraints(b)
    lines = []
    for tc in sorted(ca.keys() | cb.keys()):
        if ca.get(tc) != cb.get(tc):
            metric = f"target {tc[0]}: {tc[1]}"
            lines.append(f"~ {key}: {metric} {fmt_value(metric, ca.get(tc))} -> {fmt_value(metric, cb.get(tc))}")
    return lines


# ---------------------------------------------------------------------------------------
# The command's flow


def _check_writable(path: Path, option: str) -> None:
    if not path.parent.is_dir():
        raise ShrinkError(f"{option}: folder {path.parent} does not exist")


def check_build(build_dir: Path, baseline_path: Path, tol: Tolerances, junit: Path | None = None,
                step_summary: Path | None = None, skip_verify: bool = False) -> CheckResult:
    """Compare the build with the baseline, each artifact's files re-hashed against its
    manifest unless `skip_verify`; write the JUnit XML and append the Markdown summary
    when asked. The caller raises CheckFailed when the result did not pass."""
    if junit is not None:
        _check_writable(Path(junit), "--junit")
    baseline = read_baseline(baseline_path)
    manifests = artifact.collect_artifacts(build_dir)
    problems = None if skip_verify else {key: artifact.verify(Path(build_dir) / key) for key in manifests}
    result = CheckResult(str(build_dir), str(baseline_path), tol, compare(baseline, manifests, tol, problems))
    if junit is not None:
        write_text_atomic(junit, render_junit(result))
    if step_summary is not None:
        try:
            with open(step_summary, "a", encoding="utf-8") as f:
                f.write(render_markdown(result))
        except OSError as e:
            raise ShrinkError(f"cannot append to the step summary {step_summary} ({e.strerror or e})") from None
    return result


def update_baseline(build_dir: Path, baseline_path: Path,
                    skip_verify: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Write the baseline from the build (atomically); returns it and the changed lines.
    A build whose files differ from their manifests is refused (VerifyError) unless
    `skip_verify`. An unreadable old baseline is replaced (its changes are then listed
    against nothing)."""
    baseline_path = Path(baseline_path)
    _check_writable(baseline_path, "--baseline")
    manifests = artifact.collect_artifacts(build_dir)
    for key in manifests:
        artifact.verify_before_use(Path(build_dir) / key, skip=skip_verify)
    new = build_baseline(manifests)
    note = []
    try:
        old = read_baseline(baseline_path) if baseline_path.exists() else None
    except ShrinkError as e:
        old, note = None, [f"! the old baseline could not be read ({e}); replaced"]
    write_json_atomic(baseline_path, new)
    return new, note + baseline_changes(old, new)
