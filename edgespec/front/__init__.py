"""The front ends: what users run. `cli` (the `edgespec` command; `arguments`: its options checked before loading), `chat` (the terminal chat), `bench`
(MT-Bench side by side), `profile` (memory and latency profile), `server` (the OpenAI-compatible HTTP
server). They read an engine only through `engine.FrontEnd`'s typed surface.

May import: every other wing; nothing imports the front ends (tests/test_imports.py).
"""
