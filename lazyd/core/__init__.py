"""The pure logic: a service's lifecycle (events in, actions out, time as
an input) and the records of its starts.  Nothing here touches a socket, a
process or a clock, so every path is tested exhaustively with exact times.
"""
