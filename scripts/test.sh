#!/usr/bin/env bash
# make test: lint, then the three test tiers, then one summary line with the counts of each tier.
# The privileged tier needs root and must not skip: CI runs as root on an eBPF-capable kernel, so a
# skipped privileged test there hides a broken feature. Any skip in that tier fails the run.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py=.venv/bin/python
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0

make -s lint || status=1

for tier in unit integration privileged; do
  echo "== tests/$tier =="
  if [ "$tier" = privileged ] && [ "$(id -u)" -ne 0 ]; then
    echo "the privileged tier needs root: run sudo make test" >&2
    status=1; continue
  fi
  "$py" -m pytest -q -p no:cacheprovider "tests/$tier" --junitxml="$out/$tier.xml" "$@"
  rc=$?
  # pytest exits 5 when a tier has no tests: that is a failure too (a tier must exist).
  [ $rc -eq 0 ] || status=1
done

"$py" - "$out" <<'PY' || status=1
import sys, pathlib, xml.etree.ElementTree as ET
out = pathlib.Path(sys.argv[1])
total = {"passed": 0, "failed": 0, "skipped": 0}
bad = False
for tier in ("unit", "integration", "privileged"):
    f = out / f"{tier}.xml"
    if not f.exists():
        print(f"{tier:12s} did not run"); bad = True; continue
    s = ET.parse(f).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    tests, fails, errs, skips = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    passed = tests - fails - errs - skips
    print(f"{tier:12s} {passed:5d} passed {fails + errs:5d} failed {skips:5d} skipped")
    total["passed"] += passed; total["failed"] += fails + errs; total["skipped"] += skips
    if tests == 0: print(f"  ! the {tier} tier ran no test"); bad = True
    if tier == "privileged" and skips: print("  ! privileged tests must not skip (CI is root on an eBPF kernel)"); bad = True
print(f"total: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
sys.exit(1 if bad or total["failed"] else 0)
PY
exit $status
