"""Application-level mode (`engine: signal`): for programs that write their own restart files.

At a checkpoint round the agent does not freeze or dump anything: it asks the program to write its restart
files (a signal, or a command: trigger.py), waits until the files the configured glob names are new and stable
(trigger.py), and records them in an authenticated archive that is the agent's "image" of the generation
(archive.py), so the coordinator's manifest, retention, restart script and the batch drivers work unchanged
(phases.py is the agent's side of the round). A restart puts the files back and runs the program's restart
command under an agent (restart.py). docs/applevel.md.
"""
