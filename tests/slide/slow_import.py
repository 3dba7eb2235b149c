"""A module whose import takes :data:`SECONDS` (tests/slide/test_isolation.py preloads it in the slide reader's
child: start-up that takes longer than a call's limit, whatever the machine's speed)."""

import time

SECONDS = 3.0
time.sleep(SECONDS)
