"""STAND-IN for the plugin SDK's `transformerlab.plugin` module (tests only; not TransformerLab's code).

Like the real module, it asks the `transformerlab` package (`lab`) for the workspace when imported, with the
synchronous `get_workspace_dir()` of the 0.0.x releases the archived server pins; under 0.1.x, where that
function is a coroutine, the import fails, as the real SDK's does.
"""

from lab import storage
from lab.dirs import get_workspace_dir

WORKSPACE_DIR = get_workspace_dir()
TEMP_DIR = storage.join(get_workspace_dir(), "temp")
