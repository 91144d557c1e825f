"""Property tests over mechscope's file formats (``hypothesis``).

CI runs them reproducibly and fast: the ``mechscope`` profile is derandomized (the same
examples every run, no example database) with few examples per test, so the whole
directory takes well under a minute on 2 cores. ``HYPOTHESIS_PROFILE=thorough`` searches
for new bugs with 25 times as many random examples (minutes); a bug it finds belongs in a
loader fix and, where the derandomized run misses it, in an ``@example`` on the property.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

if importlib.util.find_spec("hypothesis") is None:  # the test extra installs it: pip install -e '.[test]'
    collect_ignore_glob = ["test_*.py"]
else:
    from hypothesis import HealthCheck, settings

    _QUIET = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("mechscope", derandomize=True, database=None, deadline=None, max_examples=40,
                              suppress_health_check=_QUIET, print_blob=True)
    settings.register_profile("thorough", derandomize=False, database=None, deadline=None, max_examples=1000,
                              suppress_health_check=_QUIET, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mechscope"))

# the shared damage strategies (tests/properties/damage.py) import by name, as tests/core's helpers do
_HERE = str(pathlib.Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
