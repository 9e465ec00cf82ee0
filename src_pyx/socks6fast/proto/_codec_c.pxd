# cython: language_level=3
# C-level surface of socks6fast.proto._codec_c for other extensions (``_relay_c`` may
# ``from socks6fast.proto._codec_c cimport ...`` to parse and write Datagram Headers of
# recvmmsg/sendmmsg batches without the GIL; STYLE.md section 1).

cdef enum:
    # Fixed part of a Datagram Header (section "Handling UDP ASSOCIATE", D5):
    # Version, Message Type, Message Length, Association ID, ATYP, Padding, Port.
    DGRAM_ADDRESS_OFFSET = 16
    # Largest Datagram Header: a 255-byte name, its length byte and D2 padding.
    DGRAM_HEADER_MAX_LENGTH = 16 + 256

    # Results of parse_datagram_header() below 0; the Python wrapper turns each
    # into the reference's WireError (message text in _codec_c.pyx).
    DGRAM_E_TRUNCATED = -1     # "datagram header is truncated"
    DGRAM_E_VERSION = -2       # "version N is not 6" (reply_code None)
    DGRAM_E_TYPE = -3          # "message type N is not a datagram"
    DGRAM_E_LENGTH = -4        # "message length N is less than M"
    DGRAM_E_ADDRESS_TYPE = -5  # "address type N is not supported"
    DGRAM_E_NAME_EMPTY = -6    # "domain name is empty"
    DGRAM_E_NAME_NUL = -7      # "domain name contains a nul byte"
    DGRAM_E_NAME_PADDING = -8  # "domain name padding is not zero" (D2: padding must be NULs)


cdef struct DatagramHeaderView:
    # Pointers into the parsed buffer: valid only while that buffer is.
    const unsigned char* association_id  # 8 bytes
    const unsigned char* address  # 4 or 16 address bytes, or the name (trailing NULs stripped)
    Py_ssize_t address_length
    Py_ssize_t header_length  # bytes before the payload
    unsigned int port
    unsigned int message_length  # as sent: header plus payload, not checked against the datagram
    unsigned int address_type  # 1, 3 or 4
    unsigned int minimum_length  # for DGRAM_E_LENGTH: the smallest allowed Message Length


cdef Py_ssize_t parse_datagram_header(
    const unsigned char* data, Py_ssize_t length, DatagramHeaderView* out
) noexcept nogil

cdef Py_ssize_t write_datagram_header(
    unsigned char* out,
    Py_ssize_t capacity,
    const unsigned char* association_id,
    unsigned int address_type,
    const unsigned char* address,
    Py_ssize_t address_length,
    unsigned int port,
    unsigned int message_length,
) noexcept nogil
