#!/usr/bin/env bash
# Mutation testing (mutmut 3) of peftops' input validation and model-level code:
#   kernels/_checks.py (all), peftops/model.py (all), and the config validate() methods with the
#   helpers they call (SIFTConfig.validate + _check_density, AoTConfig.validate,
#   WeGeFTConfig.validate + _check_hparams, SAFEConfig.validate + _is_int).
#
# usage: tools/mutation.sh [SOURCE_ROOT [WORK_DIR]]
#   SOURCE_ROOT  a peftops checkout (default: the repository this script lives in). Its files are
#                copied as they are (working tree, uncommitted edits included); it is never modified,
#                peftops is not pip-installed anywhere (an editable install stays as it is; only
#                mutmut is pip-installed, when missing).
#   WORK_DIR     where to build and run (default: a fresh mktemp -d). Results stay there:
#                  cd WORK_DIR && mutmut results           # survivors
#                  cd WORK_DIR && mutmut show <mutant>     # the diff of one mutant
#                and WORK_DIR/summary.txt (counts + surviving mutants with their diffs).
# env: JOBS (default: nproc)   parallel mutant workers
#      TESTS (default: the list below)   a file of pytest node ids, one a line
#      MUTANTS (default: PATTERNS below)  space-separated fnmatch patterns of mutant names
#
# The test subset is the fast validation / save-load / merge tests (no Triton-interpreter-heavy or
# long training tests): ~70 s for one plain run on 2 CPU cores. Only the tests that call a mutated
# function run for its mutants (mutmut's stats). Measured on 2 CPU cores, 662 mutants: 12 min wall
# for this whole script (mutmut run 704 s), 40 min when other test runs shared the cores.
# Mutants of code that runs only at import (register_method, as a decorator) survive unless a test
# calls it: mutmut forks its workers from a process that has imported peftops already.
#
# Layout: mutmut mutates files under one package path and the tests must import the mutated copy,
# but kernels/ is installed as peftops.kernels (setup.py package_dir). So WORK_DIR/peftops is
# SOURCE_ROOT/peftops with SOURCE_ROOT/kernels copied in as peftops/kernels (real files: mutmut
# does not follow symlinks), and the tests import it first from mutmut's mutants/ copy.
set -euo pipefail

SRC=$(cd "${1:-$(dirname "$0")/..}" && pwd)
WORK=${2:-$(mktemp -d /tmp/peftops-mutation.XXXXXX)}
JOBS=${JOBS:-$(nproc)}
MUTMUT_SPEC=${MUTMUT_SPEC:-mutmut==3.8.1}

[ -d "$SRC/peftops" ] && [ -d "$SRC/kernels" ] && [ -d "$SRC/tests" ] || { echo "not a peftops checkout: $SRC" >&2; exit 2; }
python -c "import mutmut" 2>/dev/null || pip install "$MUTMUT_SPEC"

DEFAULT_TESTS=(
  tests/test_pins.py::test_load_adapter_rejects_nan_inf_naming_the_tensor
  tests/test_pins.py::test_load_adapter_nan_inf_leaves_the_model_unchanged
  tests/test_pins.py::test_load_adapter_accepts_the_clean_file
  tests/test_api.py::test_save_load_and_errors
  tests/test_api.py::test_merge_unmerge
  tests/test_api.py::test_overlapping_weight_methods_raise_clearly
  "tests/test_api.py::test_apply_summary_and_plain_loop[aot+wegeft-bert]"
  "tests/test_api.py::test_apply_summary_and_plain_loop[sift@mlp+wegeft@attn-llama]"
  tests/test_aot_kernels.py::test_bad_input_raises_clear_error
  tests/test_aot_kernels.py::test_bad_grad_and_inplace_calls
  tests/test_aot_model.py::test_bad_tables_and_task_ids_raise
  tests/test_aot_model.py::test_config_validation
  tests/test_aot_model.py::test_load_into_mismatched_model_raises
  tests/test_aot_model.py::test_save_load_roundtrip
  tests/test_cka.py::test_bad_input_names_the_argument
  tests/test_safe.py::test_bad_config_names_the_field
  tests/test_safe.py::test_report_state_dict_and_errors
  tests/test_sift.py::test_select_bad_density
  tests/test_sift.py::test_sift_linear_bad_inputs
  tests/test_sift.py::test_unselected_layer
  tests/test_sift.py::test_set_indices_validation
  tests/test_sift.py::test_sparse_adamw_bad_args
  tests/test_sift.py::test_calibrate_errors
  tests/test_sift_kernels.py::test_abs_accumulate_bad_input
  tests/test_sift_kernels.py::test_topk_bad_input
  tests/test_sift_kernels.py::test_sddmm_bad_input
  tests/test_sift_kernels.py::test_sparse_adamw_step_bad_input
  tests/test_sift_kernels.py::test_scatter_merged_bad_input
  tests/test_sift_kernels.py::test_index_range_check_is_cached_per_tensor_and_redone_after_a_write
  tests/test_sift_kernels.py::test_sparse_adamw_step_fp32_weight_accepts_no_fp64_state
  tests/test_sift_model.py::test_bad_adapter_files
  tests/test_sift_model.py::test_config_and_apply
  tests/test_sift_model.py::test_save_load_merge_unmerge
  tests/test_wegeft_kernels.py::test_bad_inputs_name_the_argument
  tests/test_wegeft_model.py::test_bert_defaults_per_layer_and_load_errors
  tests/test_wegeft_model.py::test_config_and_apply_errors
  tests/test_wegeft_model.py::test_llama_defaults_shared_generators_and_save_load
  tests/test_wegeft_op.py::test_frozen_weight_required
  tests/test_all_or_nothing.py   # ~10 s; not in every checkout (skipped when absent)
  tests/test_validation_edges.py # ~3 s; both sides of every validated boundary
  tests/test_modules_to_save.py  # ~30 s; the saved task head
)
if [ -n "${TESTS:-}" ]; then mapfile -t SELECTED < <(grep -v '^\s*\(#\|$\)' "$TESTS"); else SELECTED=("${DEFAULT_TESTS[@]}"); fi
TESTS_OK=()
for t in "${SELECTED[@]}"; do
  if [ -f "$SRC/${t%%::*}" ]; then TESTS_OK+=("$t"); else echo "skipping $t (no ${t%%::*} in $SRC)" >&2; fi
done

# mutants: fnmatch patterns over mutmut's names (<module>.x_<function> / <module>.xǁ<Class>ǁ<method>)
PATTERNS=(
  "peftops.kernels._checks.*"
  "peftops.model.*"
  "peftops.sift.xǁSIFTConfigǁvalidate__mutmut_*"
  "peftops.sift.x__check_density__mutmut_*"
  "peftops.aot.xǁAoTConfigǁvalidate__mutmut_*"
  "peftops.wegeft.xǁWeGeFTConfigǁvalidate__mutmut_*"
  "peftops.wegeft.x__check_hparams__mutmut_*"
  "peftops.safe.xǁSAFEConfigǁvalidate__mutmut_*"
  "peftops.safe.x__is_int__mutmut_*"
)
if [ -n "${MUTANTS:-}" ]; then read -r -a PATTERNS <<< "$MUTANTS"; fi

echo "source: $SRC"
echo "work:   $WORK"
mkdir -p "$WORK"
cd "$WORK"
rm -rf peftops tests mutants setup.cfg pytest.ini
copy() { tar -C "$1" --exclude=__pycache__ -cf - . | { mkdir -p "$2" && tar -C "$2" -xf -; }; }
copy "$SRC/peftops" peftops
rm -rf peftops/kernels
copy "$SRC/kernels" peftops/kernels
copy "$SRC/tests" tests
cp "$SRC/pytest.ini" pytest.ini

{
  echo "[mutmut]"
  echo "source_paths = peftops"
  echo "only_mutate ="
  for f in peftops/kernels/_checks.py peftops/model.py peftops/sift.py peftops/aot.py peftops/wegeft.py peftops/safe.py; do
    echo "    $f"
  done
  echo "also_copy = pytest.ini"
  echo "pytest_add_cli_args_test_selection ="
  for t in "${TESTS_OK[@]}"; do echo "    $t"; done
} > setup.cfg

export TRITON_INTERPRET=1           # CPU only: no GPU needed for the subset (conftest sets it too)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # JOBS workers share the cores
export PYTHONDONTWRITEBYTECODE=1

# the copy, not an installed peftops, must be the one imported
python - <<'EOF'
import os, sys
sys.path.insert(0, os.getcwd())
import peftops, peftops.kernels._checks as c
for m in (peftops, c):
    assert os.path.realpath(m.__file__).startswith(os.path.realpath(os.getcwd())), m.__file__
print("imports from the copy:", peftops.__file__, c.__file__)
EOF

start=$(date +%s)
mutmut run --max-children "$JOBS" "${PATTERNS[@]}" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | tail -n 40
end=$(date +%s)

python - "$((end - start))" "${PATTERNS[@]}" <<'EOF' | tee summary.txt
import fnmatch, json, re, sys
from collections import Counter
from pathlib import Path
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

wall, patterns = sys.argv[1], sys.argv[2:]
status, path_of = {}, {}
for meta in sorted(Path("mutants").rglob("*.py.meta")):
    src = meta.relative_to("mutants").with_suffix("")  # peftops/model.py
    for k, v in json.load(open(meta))["exit_code_by_key"].items():
        if any(fnmatch.fnmatch(k, p) for p in patterns):
            status[k], path_of[k] = status_by_exit_code[v], src
c = Counter(status.values())
killed, survived, timeout = c["killed"], c["survived"], c["timeout"]
tested = sum(v for k, v in c.items() if k not in ("no tests", "not checked", "skipped"))
print(f"wall time of mutmut run: {wall} s")
print(f"mutants: {len(status)}  " + "  ".join(f"{k}: {v}" for k, v in sorted(c.items())))
print(f"score = (killed + timeout) / tested = {killed + timeout}/{tested} = {(killed + timeout) / max(tested, 1):.1%}")


def where(name, src, removed):
    """file:line of the first removed line, searched from the function's def."""
    lines = Path(src).read_text().splitlines()
    fn = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[-1]
    fn = fn.split("ǁ")[-1] if "ǁ" in fn else fn[2:]
    start = next((i for i, l in enumerate(lines) if re.match(rf"\s*(async\s+)?def {re.escape(fn)}\(", l)), 0)
    for i in range(start, len(lines)):
        if removed and lines[i].strip() == removed:
            return f"{src}:{i + 1}"
    return f"{src}:{start + 1}"


print("\nsurviving mutants by function:")
by_fn = {}
for k, s in sorted(status.items(), key=lambda kv: (kv[0].rsplit("__mutmut_", 1)[0], int(kv[0].rsplit("_", 1)[1]))):
    if s == "survived":
        by_fn.setdefault(k.rsplit("__mutmut_", 1)[0], []).append(k)
for fn, names in by_fn.items():
    print(f"\n## {fn}: {len(names)} survived")
    for n in names:
        diff = get_diff_for_mutant(n, path=path_of[n]).splitlines()
        minus = [l[1:].strip() for l in diff if l.startswith("-") and not l.startswith("---")]
        plus = [l[1:].strip() for l in diff if l.startswith("+") and not l.startswith("+++")]
        print(f"  {n}  ({where(n, path_of[n], minus[0] if minus else '')})")
        for l in minus:
            print(f"      - {l[:170]}")
        for l in plus:
            print(f"      + {l[:170]}")
for s in ("no tests", "timeout", "suspicious", "segfault", "not checked"):
    names = sorted(k for k, v in status.items() if v == s)
    if names:
        print(f"\n{s}: {len(names)}")
        for n in names:
            print(f"  {n}")
EOF
