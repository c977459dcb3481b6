"""farm's node agent: standard library only, shipped to nodes as a zipapp and cached by hash.

A node needs sshd, python3 (3.9 or newer) and a builder; nothing of farm is installed there.
"""

AGENT_VERSION = "0.1.0"
