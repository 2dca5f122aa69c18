"""BAGEL end-to-end example with the seed system's flags, e.g.

    python end2end.py --model ByteDance-Seed/BAGEL-7B-MoT --modality text2img --prompts "A cute cat"
    python end2end.py --model bagel-serve-demo --modality img2img --image-path in.png --prompts "Make it blue"

Same flags and defaults as `bagel-serve generate`; `--help` lists them.
"""

import sys

from bagel_serve.entrypoints.cli import end2end_main

if __name__ == "__main__":
    sys.exit(end2end_main())
