# Sourced by the GPU scripts before their --no-build-isolation build: CUTLASS headers for the
# staged MoE forward. Keeps PIT_CUTLASS_DIR if set, else uses an installed nvidia-cutlass (CMake
# finds it), else unpacks a carried wheel (.whl/nvidia_cutlass-*.whl; an offline GPU box) into
# /tmp/cutlass_site. Without any, the build warns and leaves the staged forward out.
if [[ -z "${PIT_CUTLASS_DIR:-}" ]] && ! python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)" 2>/dev/null \
    && ls .whl/nvidia_cutlass-*.whl > /dev/null 2>&1; then
  [[ -d /tmp/cutlass_site/cutlass_library ]] || python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/cutlass_site .whl/nvidia_cutlass-*.whl > /dev/null 2>&1
  export PIT_CUTLASS_DIR=/tmp/cutlass_site/cutlass_library/source
fi
