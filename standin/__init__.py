"""The local stand-in for AWS IoT, in pieces: ``ca`` (the test CA and its
certificates), ``responder`` (which request gets which answer, and the
faults: no broker needed to test it), ``broker`` (the mosquitto process).
``iot_standin.py`` puts them together and is the command line.
"""
