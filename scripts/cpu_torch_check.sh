#!/usr/bin/env bash
# The install as a user with a CPU-only torch meets it: a fresh virtual
# environment (no system site packages) with only that torch, divco installed the README's
# way with its [test] extra, then the README's test command. Fails if the install changed
# torch, if the extension was not built against it, or if a test fails.
#
#   bash scripts/cpu_torch_check.sh
#   DIVCO_CPU_TORCH=2.13.0   the torch to install first (here a local CPU-only wheel)
#   DIVCO_CHECK_TIMEOUT=1200 seconds for the test suite
#   DIVCO_CHECK_MARK="not slow"  a pytest -m expression; DIVCO_CHECK_PATHS="tests/ops ..."  test paths
#                            (default: the whole suite)
#
# The sources are copied (tracked and untracked-but-not-ignored files), so the checkout's own
# divco/_C*.so, built against another torch, is neither used nor replaced.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
torch_version="${DIVCO_CPU_TORCH:-2.13.0}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
mkdir "$work/src"
(cd "$root" && git ls-files -co --exclude-standard -z | tar -c --null -T - -f -) | tar -x -C "$work/src"
cd "$work/src"

SECONDS=0
pip install -q "torch==$torch_version"
before="$(python -c 'import torch; print(torch.__version__)')"
echo "torch $before installed in ${SECONDS}s"

SECONDS=0
pip install -q ninja pybind11 setuptools wheel
pip install -q --no-build-isolation -e ".[test]"
after="$(python -c 'import torch; print(torch.__version__)')"
echo "divco[test] installed in ${SECONDS}s"
if [ "$before" != "$after" ]; then
    echo "FAIL: installing divco replaced torch $before with $after" >&2
    exit 1
fi
python -W error::RuntimeWarning -c "import torch, divco, divco._C as c; built = c.build_info()['torch_version']; \
assert built == torch.__version__, (built, torch.__version__); print('divco._C built against torch', built)"

SECONDS=0
# What to run (default: the whole suite; CI runs the torch-dependent part)
selection=()
[[ -n ${DIVCO_CHECK_MARK:-} ]] && selection+=(-m "$DIVCO_CHECK_MARK")
read -r -a paths <<< "${DIVCO_CHECK_PATHS:-}"
timeout "${DIVCO_CHECK_TIMEOUT:-1200}" python -m pytest -q -n 2 -p no:cacheprovider "${selection[@]}" "${paths[@]}"
echo "suite on torch $after passed in ${SECONDS}s"
