"""fewstep.paths: what `~` / `$VAR` expansion could not expand is named, not turned into a folder."""
from fewstep.paths import expand, unexpanded


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
