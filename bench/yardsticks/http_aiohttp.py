"""A yardstick for bench/http.py's choice of design: aiohttp (a well-kept asyncio HTTP server library) serving a
folder with `web.static` (its FileResponse sends with loop.sendfile). Not a Bootfleet dependency; run it from a
virtualenv that has aiohttp:

    python -m venv /tmp/aio && /tmp/aio/bin/pip install aiohttp
    /tmp/aio/bin/python bench/yardsticks/http_aiohttp.py ROOT PORT
"""

import sys

from aiohttp import web

app = web.Application()
app.router.add_static("/", sys.argv[1], show_index=False, follow_symlinks=False)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
