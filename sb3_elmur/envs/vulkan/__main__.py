"""``python -m sb3_elmur.envs.vulkan install|check [--dir DIR]``: see :func:`sb3_elmur.envs.vulkan.main`."""

import sys

from sb3_elmur.envs.vulkan import main

sys.exit(main())
