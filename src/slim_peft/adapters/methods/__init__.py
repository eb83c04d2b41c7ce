"""The methods, each a folder (config.py + layer.py), registered here: one line per method.

To add a method: write `methods/<name>/` with a config dataclass (subclass of `AdapterConfig` whose `method`
field defaults to `<name>`), its layers and an `inject` function, build a `MethodSpec` in its `__init__.py`,
and add it to the tuple below.
"""

from ..registry import register
from . import dora, er, ilora, lora, loramoe, mixlora, mola, slim

for _method in (lora, dora, slim, mixlora, loramoe, mola, ilora, er):
    register(_method.SPEC)
