"""`lazyd demo` and the parallel-boot example, with the small programs they
run as services (`lazyd.demo.programs`).  Nothing in the daemon imports this.
"""
