"""The end-to-end suite. Imported before conftest.py, so what follows holds for the gateway's
modules too.

Where the environment asks for no bytecode beside the sources (PYTHONDONTWRITEBYTECODE), each xdist
worker of each run compiled every test module and the gateway's own afresh (~3 s of CPU a worker),
and so did every `gateway serve`, `demo` or `simulate` a test starts (~0.15 s each, some sixty of
them). Their bytecode is kept under the temporary directory instead, out of the tree: in this
process while the suite is collected (conftest.py puts the flags back after), and in the child
processes through the environment they inherit from this one."""

import os
import sys
import tempfile

BYTECODE_FLAGS = (sys.dont_write_bytecode, sys.pycache_prefix)
if sys.dont_write_bytecode and not sys.pycache_prefix:
    sys.pycache_prefix = os.path.join(tempfile.gettempdir(), "ultravox-gateway-test-bytecode")
    sys.dont_write_bytecode = False
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix
