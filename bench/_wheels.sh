# Sourced by the device scripts (bench/gpu_check.sh, bench/gpu_budget.sh) at the repository root:
# with a folder .whl/ (the wheels the bare GPU image lacks: pydantic, pydantic-core,
# annotated-types, typing-inspection, constriction) they go into /tmp/site, nothing downloaded;
# PYTHONPATH then finds them and this checkout. Needs PY; pip's output goes to WHEELS_LOG (default
# /dev/null; a variable, not an argument: a sourced file sees its caller's arguments when given none).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "${WHEELS_LOG:-/dev/null}" 2>&1 \
        || echo "pip install of .whl/ failed${WHEELS_LOG:+ (see $WHEELS_LOG)}" >&2
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
