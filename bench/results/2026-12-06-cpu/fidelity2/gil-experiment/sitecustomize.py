# The GIL experiment (README): every Python process of the run (the server's ranks, the client)
# switches threads after 0.5 ms instead of CPython's default 5 ms.
import sys

sys.setswitchinterval(0.0005)
