# Sourced by gpu_check.sh and device_checks.sh: the test ids a sanitizer run takes in chunks, one
# process per chunk (compute-sanitizer's own process has crashed partway through long runs).
#   pytest_ids PYTHON FILE EXPR   ->  the ids of FILE's tests selected by -k EXPR, one per line
pytest_ids() {
  "$1" -P -m pytest "$2" -k "$3" --collect-only -q -p no:cacheprovider 2>/dev/null | grep "::"
}
