"""Provision only the agent workloads (Terminal-Bench, Hermes) on the hosts
with workload_enabled: a workstation that reaches a route over the LAN.

    pyinfra inventory.py workload.py --limit workload

deploy.py runs the same step (9) on the route's own hosts.
"""

from tasks.as_user import route_user_args
from tasks.workload import provision_workload

provision_workload(**route_user_args())
