"""A plugin whose import fails, as one with a missing dependency would."""

import dxserve_no_such_dependency  # noqa: F401
