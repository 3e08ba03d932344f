"""Tries to log in through the proxy: `login.py HOST:PORT USER PASSWORD CA.pem`.

Prints `connected` or `auth failed: MESSAGE`; any other failure raises."""

import ssl
import sys

from cassandra import AuthenticationFailed
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.policies import RoundRobinPolicy

addr, user, password, ca = sys.argv[1:5]
host, port = addr.rsplit(":", 1)
context = ssl.create_default_context(cafile=ca)
context.check_hostname = False
cluster = Cluster(
    [host],
    port=int(port),
    protocol_version=4,
    auth_provider=PlainTextAuthProvider(user, password),
    ssl_context=context,
    execution_profiles={EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=RoundRobinPolicy())},
)
try:
    cluster.connect()
    print("connected")
except NoHostAvailable as e:
    errors = list(e.errors.values())
    if errors and isinstance(errors[0], AuthenticationFailed):
        print(f"auth failed: {errors[0]}")
    else:
        raise
finally:
    cluster.shutdown()
