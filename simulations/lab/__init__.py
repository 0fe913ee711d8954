"""The chaos lab: real agents on a kernel network of namespaces (``rumor lab``).

The simulator's twin on real sockets: the same scenarios and report format as
``rumor sim``, run by real ``rumor agent`` processes, one per network namespace, with
network conditions applied by the kernel (nftables, and a delay line where the kernel
has no netem). ``rumor lab compare`` runs both and prints where they part.
"""
