import sys

from mlx_route_proxy.cli import main

sys.exit(main())
