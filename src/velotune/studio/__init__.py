"""`velotune studio`: a local web dashboard over a folder of runs.

runs.py reads what runs wrote (never writes into a run folder), launcher.py starts, watches and
stops `velotune train` children, chat.py answers with a finished run's adapter, server.py is the
HTTP API, event stream and static page (static/, with uPlot vendored). It sits at the top of the
import graph beside cli/.
"""
