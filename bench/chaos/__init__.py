"""The chaos tool: a fault schedule (nemesis), a TCP fault proxy, a recorded history and
its checker."""
