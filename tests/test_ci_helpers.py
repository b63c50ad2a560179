"""skip_unless_ci: a missing precondition skips on a developer's machine and fails under CI."""

import pytest
from _ci import skip_unless_ci


@pytest.mark.parametrize("value, outcome", [(None, pytest.skip.Exception), ("", pytest.skip.Exception),
                                            ("false", pytest.skip.Exception), ("true", pytest.fail.Exception),
                                            ("1", pytest.fail.Exception)])
def test_skip_unless_ci(monkeypatch, value, outcome):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    with pytest.raises(outcome, match="no wheel"):
        skip_unless_ci("no wheel")
