"""Put each host's server back on its previous release (README: Releases and rollback).

    pyinfra inventory.py rollback.py

The same checks as a deploy (smoke, start, readiness; stop-first when the
memory budget holds one copy of the model). The next `deploy.py` run moves the
server to the release its data asks for again.
"""

from tasks.as_user import route_user_args
from tasks.server import roll_back_server

roll_back_server(**route_user_args())
