"""The handshakes of each side, apart from the endpoints' I/O shells.

``handshake.language``: the language rank's side (connect to an encoder, offer
transports, export the pool, set up the control channel); ``handshake.encoder``:
the encoder's side (hello, pool description, ready or retry, refusals).  Each
hands its endpoint a finished link or peer through a narrow interface; the
rooms never see a handshake.
"""
