"""The HTTP side: the WSGI application and its routes, the ISO's answer, keys, origins, lookups, health, the desk page.
It asks the spine (jobs, audit, metrics) for work; it never imports steps, service or server, which wire it."""
