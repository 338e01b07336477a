"""``python -m kvflash.flash_attn_interface --heads 32 8 --head-size 128 --page 16 --kv auto,fp8_e4m3``: run a
warm-up (:func:`kvflash.flash_attn_interface.warmup`) and print how many kernel variants it compiled and how long
it took (``--dry-run``: count only). ``--help`` lists the engine settings it takes."""

import sys

from kvflash.flash_attn_interface.warmup import main

sys.exit(main())
