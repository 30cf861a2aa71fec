"""How lazyd learns that a service is ready: the connect probe, and sd_notify
messages on a per-service notify socket (believed only from the service's
own processes).  `ready: started` and `ready: {delay}` need nothing here:
the lifecycle decides those by itself.
"""
