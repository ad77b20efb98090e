"""The lab: a simulated multi-node cluster in network namespaces and cgroups on one Linux host.

`plan` names everything a topology becomes (pure), `cluster` builds, inspects and removes it
(`Lab.up`, `Lab.load`, `teardown`), `commands` is `nodeagent lab up|down|status|exec`.
"""
