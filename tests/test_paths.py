"""fewstep.paths: what `~` / `$VAR` expansion could not expand is named, not turned into a folder."""
from fewstep.paths import expand, temporary_beside, unexpanded


def test_unexpanded_names_unset_variables_and_unsupported_forms(monkeypatch):
    monkeypatch.setenv("FEWSTEP_SET_DIR", "/scratch/me")
    monkeypatch.delenv("FEWSTEP_UNSET_DIR", raising=False)
    for value, want in [("$FEWSTEP_SET_DIR/cache", None), ("${FEWSTEP_SET_DIR}/cache", None), ("/plain/path", None),
                        ("$FEWSTEP_UNSET_DIR/cache", "environment variable FEWSTEP_UNSET_DIR is not set"),
                        ("${FEWSTEP_UNSET_DIR}/c", "environment variable FEWSTEP_UNSET_DIR is not set"),
                        # a shell default is not what Python expands: named as such, even with the variable set
                        ("${FEWSTEP_SET_DIR:-/tmp}/c", "${FEWSTEP_SET_DIR:-/tmp} is not expanded (only $VAR and "
                                                       "${VAR} are, for variables that are set)")]:
        assert unexpanded(expand(value)) == want, value
    assert expand("$FEWSTEP_SET_DIR/c") == "/scratch/me/c"


def test_temporary_names_differ_between_hosts_and_processes(monkeypatch, tmp_path):
    """Two nodes filling one shared cache can run processes with the same PID: a temporary name of PID alone would be
    written by both, and the rename could publish a mix. The name carries the host too; it sits beside the file."""
    import socket

    path = str(tmp_path / "ab" / "key.safetensors")
    monkeypatch.setattr(socket, "gethostname", lambda: "node1")
    one = temporary_beside(path)
    monkeypatch.setattr(socket, "gethostname", lambda: "node2")
    assert temporary_beside(path) != one and one.startswith(path + ".tmp.") and "node1" in one
