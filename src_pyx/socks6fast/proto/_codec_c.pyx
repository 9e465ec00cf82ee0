# cython: language_level=3
"""Cython twin of ``socks6fast.proto._codec_py``, the SOCKS 6 wire codec (draft-olteanu-intarea-socks-6-11).

Strategy: ``_codec_py`` is the truth. This module repeats it check for check, in
the same order, and raises the same exception class with the same ``reply_code``
and the same message text; tests/test_codec_hypothesis.py holds the two to that
on random, mutated and generated input. Only the machinery differs:

* Input is read through one ``Py_buffer`` (PyObject_GetBuffer, PyBUF_SIMPLE: the
  contiguous bytes of any buffer exporter, no copy) as a ``const unsigned char*``.
  Every read is preceded by an explicit check against the bytes available; raw
  pointer reads are never bounds-checked by Cython, so those checks are the only
  safety and each one sits right before the read it guards (STYLE.md section 5).
* Messages, enums and exceptions are the Python ones (STYLE.md 3.2). The frozen
  slotted dataclasses are built without ``__init__``: ``tp_alloc`` gives an
  instance with every slot empty and each field is stored straight into its
  ``__slots__`` member, at the offset read once at import from the class's member
  descriptor. That is what ``member_set`` does without the frozen ``__setattr__``
  in front of it (about 10x faster than ``__init__``), and the object is ==, hashes
  and prints exactly like one made by ``__init__``.
* Enum fields hold the very members the reference returns, taken from 256-entry
  tables indexed by the wire byte.
* Rare inputs go through the stdlib calls the reference makes, so acceptance
  stays identical: IPv6 text is parsed by ``ipaddress``; IPv4-mapped IPv6
  addresses are printed by ``ipaddress`` (Python 3.13 changed their text).
* ``parse_datagram_header`` / ``write_datagram_header`` (declared in
  _codec_c.pxd) are the GIL-free per-packet core, for ``_relay_c`` too.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.exc cimport PyErr_Clear, PyErr_ExceptionMatches
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_AsTuple
from cpython.long cimport PyLong_FromLong, PyLong_FromSsize_t, PyLong_FromUnsignedLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject, PyTypeObject
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8, PyUnicode_GET_LENGTH
from libc.string cimport memchr, memcpy, memset

import dataclasses
import ipaddress

from ..constants import (
    MAX_INITIAL_DATA_LENGTH,
    MAX_OPTIONS_LENGTH,
    MAX_WINDOW_SIZE,
    AddressType,
    AuthReplyType,
    Availability,
    Command,
    DatagramErrorCode,
    OptionKind,
    Parity,
    ReplyCode,
    StackCode,
    StackLeg,
)
from ..errors import LocalProtocolError, WireError
from .messages import (
    AssociationConfirmation,
    AssociationInit,
    AuthData,
    AuthMethodAdvertisement,
    AuthMethodSelection,
    AuthReply,
    Datagram,
    DatagramError,
    DatagramHeader,
    HappyEyeballsOption,
    IdempotenceAccepted,
    IdempotenceExpenditure,
    IdempotenceRejected,
    IdempotenceRequest,
    IdempotenceWindow,
    IPTOSOption,
    ListenBacklogOption,
    MultipathOption,
    NoFragmentationOption,
    OperationReply,
    PortParityOption,
    Request,
    SessionID,
    SessionInvalid,
    SessionOK,
    SessionRequest,
    SessionTeardown,
    TFOOption,
    TTLOption,
    UDPErrorOption,
    UnknownOption,
    UnknownStackOption,
)

__all__ = [
    "datagram_header_length",
    "decode_association_message",
    "decode_auth_reply",
    "decode_datagram_header",
    "decode_operation_reply",
    "decode_options",
    "decode_request",
    "encode_association_message",
    "encode_auth_reply",
    "encode_datagram_header",
    "encode_operation_reply",
    "encode_options",
    "encode_request",
    "encode_version_mismatch",
]


cdef extern from *:
    """
    #include <structmember.h>

    /* Offset of a plain object slot (the T_OBJECT_EX member descriptor that
       __slots__ creates), or -1 for any other kind of attribute. */
    static Py_ssize_t s6_slot_offset(PyObject *descr) {
        PyMemberDef *m;
        if (Py_TYPE(descr) != &PyMemberDescr_Type) return -1;
        /* Cast: checked just above that descr is a member descriptor. */
        m = ((PyMemberDescrObject *)descr)->d_member;
        if (m->type != T_OBJECT_EX || (m->flags & READONLY)) return -1;
        return m->offset;
    }

    /* A new instance with every slot NULL; tp_alloc also starts GC tracking.
       Only used on the message classes, whose tp_new is object.__new__. */
    static inline PyObject *s6_alloc(PyTypeObject *tp) { return tp->tp_alloc(tp, 0); }

    /* Store a new reference to v in an EMPTY slot of an object s6_alloc just
       made: what member_set() does for T_OBJECT_EX, minus the frozen dataclass
       __setattr__ in front of it. The cast turns the offset into the slot. */
    static inline void s6_slot_init(PyObject *obj, Py_ssize_t off, PyObject *v) {
        Py_INCREF(v);
        *(PyObject **)((char *)obj + off) = v;
    }

    /* Borrowed reference to a slot's content, NULL when empty (then the caller
       falls back to getattr, which raises AttributeError like the reference). */
    static inline PyObject *s6_slot_peek(PyObject *obj, Py_ssize_t off) {
        return *(PyObject **)((char *)obj + off);
    }
    """
    Py_ssize_t s6_slot_offset(object descr)
    object s6_alloc(PyTypeObject* tp)
    void s6_slot_init(object obj, Py_ssize_t off, object value)
    PyObject* s6_slot_peek(object obj, Py_ssize_t off)

    bint PyUnicode_IS_ASCII(object text)
    const unsigned char* PyUnicode_1BYTE_DATA(object text)
    str PyUnicode_FromKindAndData(int kind, const void* data, Py_ssize_t size)
    int PyUnicode_1BYTE_KIND
    long long PyLong_AsLongLongAndOverflow(object value, int* overflow) except? -1
    # exc NULL: clamp to PY_SSIZE_T_MIN/MAX instead of raising OverflowError.
    Py_ssize_t PyNumber_AsSsize_t(object value, PyObject* exc) except? -1
    # PyObject_GetBuffer without Cython's automatic raise: the caller maps
    # BufferError (a non-contiguous exporter) to the reference's WireError.
    int s6_get_buffer "PyObject_GetBuffer"(object obj, Py_buffer* view, int flags)


# --- Wire sizes (the draft's figures; same names as in _codec_py) ---------------

cdef enum:
    _VERSION = 6
    # Request / Operation Reply: Version, Code, Options Length, Port, Padding, ATYP.
    _ADDRESSED_HEADER_LENGTH = 8
    # Authentication Reply: Version, Type, Options Length.
    _AUTH_REPLY_HEADER_LENGTH = 4
    # UDP Association Header prefix: Version, Message Type, Message Length.
    _ASSOC_PREFIX_LENGTH = 4
    _ASSOCIATION_ID_LENGTH = 8
    _ASSOC_HEADER_LENGTH = 12
    _ASSOCIATION_MESSAGE_LENGTH = 12
    # Datagram Error: Reporter ATYP, Error Code, Padding before the reporter address.
    _REPORTER_PREFIX_LENGTH = 4
    _MIN_ADDRESS_FIELD_LENGTH = 4
    _IPV4_LENGTH = 4
    _IPV6_LENGTH = 16
    _MIN_DGRAM_HEADER_LENGTH = 20
    _MIN_DGRAM_ERROR_LENGTH = 28
    _MAX_DOMAIN_LENGTH = 255
    _OPTION_HEADER_LENGTH = 4
    _STACK_OPTION_LENGTH = 8
    _EMPTY_OPTION_LENGTH = 4
    _U32_OPTION_LENGTH = 8
    _WINDOW_OPTION_LENGTH = 12
    _METHOD_SELECTION_LENGTH = 8
    _MIN_DATA_OPTION_LENGTH = 8
    _MAX_OPTION_LENGTH = 0xFFFF
    _STACK_LEVEL_MASK = 0x3F
    _STACK_LEG_SHIFT = 6
    _STACK_LEG_MAX = 3
    # Address Type and Message Type bytes (constants.AddressType / UDPMessageType).
    _ATYP_IPV4 = 1
    _ATYP_DOMAIN = 3
    _ATYP_IPV6 = 4
    _MSG_INIT = 1
    _MSG_CONFIRMATION = 2
    _MSG_DATAGRAM = 3
    _MSG_ERROR = 4
    # Option kinds (constants.OptionKind), for the decoder's switch.
    _KIND_STACK = 1
    _KIND_ADVERTISEMENT = 2
    _KIND_SELECTION = 3
    _KIND_AUTH_DATA = 4
    _KIND_SESSION_REQUEST = 5
    _KIND_SESSION_ID = 6
    _KIND_SESSION_OK = 8
    _KIND_SESSION_INVALID = 9
    _KIND_SESSION_TEARDOWN = 10
    _KIND_IDEMPOTENCE_REQUEST = 11
    _KIND_IDEMPOTENCE_WINDOW = 12
    _KIND_IDEMPOTENCE_EXPENDITURE = 13
    _KIND_IDEMPOTENCE_ACCEPTED = 14
    _KIND_IDEMPOTENCE_REJECTED = 15
    # Stack (Level << 8 | Code) keys (constants.StackCode).
    _SC_IP_TOS = 0x101
    _SC_HAPPY_EYEBALLS = 0x102
    _SC_TTL = 0x103
    _SC_NO_FRAGMENTATION = 0x104
    _SC_TFO = 0x401
    _SC_MULTIPATH = 0x402
    _SC_LISTEN_BACKLOG = 0x403
    _SC_UDP_ERROR = 0x501
    _SC_PORT_PARITY = 0x502
    # Stack Leg 2 (constants.StackLeg.PROXY_REMOTE), DatagramErrorCode.DATAGRAM_TOO_BIG.
    _LEG_PROXY_REMOTE = 2
    _DGRAM_TOO_BIG = 4
    _CMD_NOOP = 0  # constants.Command.NOOP

# Where draft-11 places each known option (REQ-06), as bit masks over the kind:
# a known kind whose bit is clear is decoded as an opaque UnknownOption. Same
# sets as the reference's _REQUEST_KINDS, _AUTH_REPLY_KINDS, _OPERATION_REPLY_KINDS
# (tests/test_codec.py test_req06_placement_tables_agree compares them).
cdef enum:
    _ALL_KINDS = 0xFFFE  # bits 1-15: every kind draft-11 defines (7 is not one; _known_kind says so)
    _REQUEST_KINDS = ((1 << _KIND_STACK) | (1 << _KIND_ADVERTISEMENT) | (1 << _KIND_AUTH_DATA)
                      | (1 << _KIND_SESSION_REQUEST) | (1 << _KIND_SESSION_ID) | (1 << _KIND_SESSION_TEARDOWN)
                      | (1 << _KIND_IDEMPOTENCE_REQUEST) | (1 << _KIND_IDEMPOTENCE_EXPENDITURE))
    _AUTH_REPLY_KINDS = ((1 << _KIND_SELECTION) | (1 << _KIND_AUTH_DATA) | (1 << _KIND_SESSION_OK)
                         | (1 << _KIND_SESSION_INVALID) | (1 << _KIND_SESSION_ID)
                         | (1 << _KIND_IDEMPOTENCE_WINDOW) | (1 << _KIND_IDEMPOTENCE_ACCEPTED)
                         | (1 << _KIND_IDEMPOTENCE_REJECTED))
    _OPERATION_REPLY_KINDS = (1 << _KIND_STACK) | (1 << _KIND_SESSION_ID)

cdef unsigned long _U32_MAX = 0xFFFFFFFF
cdef long long _MAX_WINDOW_SIZE = MAX_WINDOW_SIZE
cdef long long _MAX_INITIAL_DATA_LENGTH = MAX_INITIAL_DATA_LENGTH
cdef Py_ssize_t _MAX_OPTIONS_LENGTH = MAX_OPTIONS_LENGTH


def _check_layout(cls):
    """Build the slot layout of a message class (the import-time check, for tests)."""
    _layout(cls)


def _check_constants():
    # The enum above mirrors constants.py for the C switch statements; a drift
    # would silently change the wire format, so refuse to load instead.
    expected = (
        (_KIND_STACK, OptionKind.STACK),
        (_KIND_ADVERTISEMENT, OptionKind.AUTH_METHOD_ADVERTISEMENT),
        (_KIND_SELECTION, OptionKind.AUTH_METHOD_SELECTION),
        (_KIND_AUTH_DATA, OptionKind.AUTH_DATA),
        (_KIND_SESSION_REQUEST, OptionKind.SESSION_REQUEST),
        (_KIND_SESSION_ID, OptionKind.SESSION_ID),
        (_KIND_SESSION_OK, OptionKind.SESSION_OK),
        (_KIND_SESSION_INVALID, OptionKind.SESSION_INVALID),
        (_KIND_SESSION_TEARDOWN, OptionKind.SESSION_TEARDOWN),
        (_KIND_IDEMPOTENCE_REQUEST, OptionKind.IDEMPOTENCE_REQUEST),
        (_KIND_IDEMPOTENCE_WINDOW, OptionKind.IDEMPOTENCE_WINDOW),
        (_KIND_IDEMPOTENCE_EXPENDITURE, OptionKind.IDEMPOTENCE_EXPENDITURE),
        (_KIND_IDEMPOTENCE_ACCEPTED, OptionKind.IDEMPOTENCE_ACCEPTED),
        (_KIND_IDEMPOTENCE_REJECTED, OptionKind.IDEMPOTENCE_REJECTED),
        (_SC_IP_TOS, StackCode.IP_TOS),
        (_SC_HAPPY_EYEBALLS, StackCode.HAPPY_EYEBALLS),
        (_SC_TTL, StackCode.TTL),
        (_SC_NO_FRAGMENTATION, StackCode.NO_FRAGMENTATION),
        (_SC_TFO, StackCode.TFO),
        (_SC_MULTIPATH, StackCode.MULTIPATH),
        (_SC_LISTEN_BACKLOG, StackCode.LISTEN_BACKLOG),
        (_SC_UDP_ERROR, StackCode.UDP_ERROR),
        (_SC_PORT_PARITY, StackCode.PORT_PARITY),
        (_ATYP_IPV4, AddressType.IPV4),
        (_ATYP_DOMAIN, AddressType.DOMAIN_NAME),
        (_ATYP_IPV6, AddressType.IPV6),
    )
    for value, member in expected:
        if value != member:
            raise ImportError(f"_codec_c is out of date with constants.py: {member!r} is not {value}")
    if len(OptionKind) != 14 or len(StackCode) != 9:
        raise ImportError("_codec_c is out of date with constants.py: new option kinds or stack codes")
    if (_LEG_PROXY_REMOTE != StackLeg.PROXY_REMOTE or _DGRAM_TOO_BIG != DatagramErrorCode.DATAGRAM_TOO_BIG
            or _CMD_NOOP != Command.NOOP):
        raise ImportError("_codec_c is out of date with constants.py: legs, error codes or commands")


_check_constants()


# --- Enum lookup tables: wire byte -> member, or None ---------------------------


cdef tuple _byte_table(enum_class):
    table = [None] * 256
    for member in enum_class:
        if 0 <= member.value < 256:
            table[member.value] = member
    return tuple(table)


cdef tuple _COMMANDS = _byte_table(Command)
cdef tuple _REPLY_CODES = _byte_table(ReplyCode)
cdef tuple _AUTH_REPLY_TYPES = _byte_table(AuthReplyType)
cdef tuple _ADDRESS_TYPES = _byte_table(AddressType)
cdef tuple _STACK_LEGS = _byte_table(StackLeg)
cdef tuple _AVAILABILITY = _byte_table(Availability)
cdef tuple _PARITIES = _byte_table(Parity)
cdef tuple _DGRAM_ERROR_CODES = _byte_table(DatagramErrorCode)

cdef object _ADDRESS_TYPE_NOT_SUPPORTED = ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
cdef object _IPV4_MEMBER = AddressType.IPV4
cdef object _IPV6_MEMBER = AddressType.IPV6
cdef object _DOMAIN_MEMBER = AddressType.DOMAIN_NAME


cdef inline object _member(tuple table, unsigned int value):
    # Every table has 256 entries and value is a wire byte (< 256).
    return <object>PyTuple_GET_ITEM(table, value)


# --- Building frozen slotted dataclasses without __init__ -----------------------


@cython.final
cdef class _Layout:
    """Where each field of one message class lives in its instances."""

    cdef object cls
    cdef PyTypeObject* type
    cdef Py_ssize_t off[7]
    cdef int nfields
    cdef int code  # option classes: which encoder branch (_OPT_*), else 0


cdef _Layout _layout(object cls, int code=0):
    cdef _Layout layout = _Layout.__new__(_Layout)
    # Instances are built without calling __init__, so a check a message class runs
    # there (a __post_init__, a hand-written __init__) would be skipped on this path
    # only: refuse to load instead, so that no decoder path bypasses a message's own
    # checks. Such a class must be built through __init__ here (slower) first.
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise ImportError(f"{cls.__name__} is not a frozen dataclass")
    # A generated __init__ is compiled from a string by dataclasses; a hand-written one
    # (which dataclasses keeps) comes from a file.
    generated = getattr(getattr(cls.__init__, "__code__", None), "co_filename", "") == "<string>"
    if hasattr(cls, "__post_init__") or not generated:
        raise ImportError(f"{cls.__name__} has checks in __init__/__post_init__ that _codec_c would skip")
    names = [f.name for f in dataclasses.fields(cls)]
    if len(names) > 7:
        raise ImportError(f"{cls.__name__} has more fields than _codec_c supports")
    layout.cls = cls
    # Cast: a class object is a PyTypeObject.
    layout.type = <PyTypeObject*>cls
    layout.nfields = len(names)
    layout.code = code
    for i, name in enumerate(names):
        layout.off[i] = s6_slot_offset(cls.__dict__[name])
        if layout.off[i] < 0:
            raise ImportError(f"{cls.__name__}.{name} is not a plain __slots__ member")
    return layout


cdef inline object _new1(_Layout L, object a):
    obj = s6_alloc(L.type)
    s6_slot_init(obj, L.off[0], a)
    return obj


cdef inline object _new2(_Layout L, object a, object b):
    obj = s6_alloc(L.type)
    s6_slot_init(obj, L.off[0], a)
    s6_slot_init(obj, L.off[1], b)
    return obj


cdef inline object _new3(_Layout L, object a, object b, object c):
    obj = s6_alloc(L.type)
    s6_slot_init(obj, L.off[0], a)
    s6_slot_init(obj, L.off[1], b)
    s6_slot_init(obj, L.off[2], c)
    return obj


cdef inline object _new4(_Layout L, object a, object b, object c, object d):
    obj = s6_alloc(L.type)
    s6_slot_init(obj, L.off[0], a)
    s6_slot_init(obj, L.off[1], b)
    s6_slot_init(obj, L.off[2], c)
    s6_slot_init(obj, L.off[3], d)
    return obj


cdef inline object _new5(_Layout L, object a, object b, object c, object d, object e):
    obj = s6_alloc(L.type)
    s6_slot_init(obj, L.off[0], a)
    s6_slot_init(obj, L.off[1], b)
    s6_slot_init(obj, L.off[2], c)
    s6_slot_init(obj, L.off[3], d)
    s6_slot_init(obj, L.off[4], e)
    return obj


cdef inline object _field(object obj, _Layout L, int i, str name, bint exact):
    """Field i of a message: read from its slot when obj's class is exactly L's."""
    cdef PyObject* value
    if exact:
        value = s6_slot_peek(obj, L.off[i])
        if value != NULL:
            return <object>value
    return getattr(obj, name)


# Encoder branches of the option classes (the reference's match order).
cdef enum:
    _OPT_IPTOS = 1
    _OPT_HAPPY_EYEBALLS
    _OPT_TTL
    _OPT_NO_FRAGMENTATION
    _OPT_TFO
    _OPT_MULTIPATH
    _OPT_LISTEN_BACKLOG
    _OPT_UDP_ERROR
    _OPT_PORT_PARITY
    _OPT_UNKNOWN_STACK
    _OPT_ADVERTISEMENT
    _OPT_SELECTION
    _OPT_AUTH_DATA
    _OPT_SESSION_ID
    _OPT_IDEMPOTENCE_REQUEST
    _OPT_IDEMPOTENCE_WINDOW
    _OPT_IDEMPOTENCE_EXPENDITURE
    _OPT_UNKNOWN
    _OPT_SESSION_REQUEST
    _OPT_SESSION_OK
    _OPT_SESSION_INVALID
    _OPT_SESSION_TEARDOWN
    _OPT_IDEMPOTENCE_ACCEPTED
    _OPT_IDEMPOTENCE_REJECTED

cdef _Layout _L_IPTOS = _layout(IPTOSOption, _OPT_IPTOS)
cdef _Layout _L_HAPPY_EYEBALLS = _layout(HappyEyeballsOption, _OPT_HAPPY_EYEBALLS)
cdef _Layout _L_TTL = _layout(TTLOption, _OPT_TTL)
cdef _Layout _L_NO_FRAGMENTATION = _layout(NoFragmentationOption, _OPT_NO_FRAGMENTATION)
cdef _Layout _L_TFO = _layout(TFOOption, _OPT_TFO)
cdef _Layout _L_MULTIPATH = _layout(MultipathOption, _OPT_MULTIPATH)
cdef _Layout _L_LISTEN_BACKLOG = _layout(ListenBacklogOption, _OPT_LISTEN_BACKLOG)
cdef _Layout _L_UDP_ERROR = _layout(UDPErrorOption, _OPT_UDP_ERROR)
cdef _Layout _L_PORT_PARITY = _layout(PortParityOption, _OPT_PORT_PARITY)
cdef _Layout _L_UNKNOWN_STACK = _layout(UnknownStackOption, _OPT_UNKNOWN_STACK)
cdef _Layout _L_ADVERTISEMENT = _layout(AuthMethodAdvertisement, _OPT_ADVERTISEMENT)
cdef _Layout _L_SELECTION = _layout(AuthMethodSelection, _OPT_SELECTION)
cdef _Layout _L_AUTH_DATA = _layout(AuthData, _OPT_AUTH_DATA)
cdef _Layout _L_SESSION_ID = _layout(SessionID, _OPT_SESSION_ID)
cdef _Layout _L_IDEMPOTENCE_REQUEST = _layout(IdempotenceRequest, _OPT_IDEMPOTENCE_REQUEST)
cdef _Layout _L_IDEMPOTENCE_WINDOW = _layout(IdempotenceWindow, _OPT_IDEMPOTENCE_WINDOW)
cdef _Layout _L_IDEMPOTENCE_EXPENDITURE = _layout(IdempotenceExpenditure, _OPT_IDEMPOTENCE_EXPENDITURE)
cdef _Layout _L_UNKNOWN = _layout(UnknownOption, _OPT_UNKNOWN)
cdef _Layout _L_REQUEST = _layout(Request)
cdef _Layout _L_AUTH_REPLY = _layout(AuthReply)
cdef _Layout _L_OPERATION_REPLY = _layout(OperationReply)
cdef _Layout _L_ASSOCIATION_INIT = _layout(AssociationInit)
cdef _Layout _L_ASSOCIATION_CONFIRMATION = _layout(AssociationConfirmation)
cdef _Layout _L_DATAGRAM_HEADER = _layout(DatagramHeader)
cdef _Layout _L_DATAGRAM = _layout(Datagram)
cdef _Layout _L_DATAGRAM_ERROR = _layout(DatagramError)

# Option classes in the reference's ``match`` order, for subclass instances.
cdef tuple _OPTION_LAYOUTS = (
    _L_IPTOS, _L_HAPPY_EYEBALLS, _L_TTL, _L_NO_FRAGMENTATION, _L_TFO, _L_MULTIPATH,
    _L_LISTEN_BACKLOG, _L_UDP_ERROR, _L_PORT_PARITY, _L_UNKNOWN_STACK, _L_ADVERTISEMENT,
    _L_SELECTION, _L_AUTH_DATA, _L_SESSION_ID, _L_IDEMPOTENCE_REQUEST, _L_IDEMPOTENCE_WINDOW,
    _L_IDEMPOTENCE_EXPENDITURE, _L_UNKNOWN,
    _layout(SessionRequest, _OPT_SESSION_REQUEST), _layout(SessionOK, _OPT_SESSION_OK),
    _layout(SessionInvalid, _OPT_SESSION_INVALID), _layout(SessionTeardown, _OPT_SESSION_TEARDOWN),
    _layout(IdempotenceAccepted, _OPT_IDEMPOTENCE_ACCEPTED),
    _layout(IdempotenceRejected, _OPT_IDEMPOTENCE_REJECTED),
)
cdef dict _OPTION_LAYOUT_BY_TYPE = {(<_Layout>L).cls: L for L in _OPTION_LAYOUTS}

# The field-less options decode to shared instances (the reference does the same).
cdef object _SESSION_REQUEST = SessionRequest()
cdef object _SESSION_OK = SessionOK()
cdef object _SESSION_INVALID = SessionInvalid()
cdef object _SESSION_TEARDOWN = SessionTeardown()
cdef object _IDEMPOTENCE_ACCEPTED = IdempotenceAccepted()
cdef object _IDEMPOTENCE_REJECTED = IdempotenceRejected()

cdef object _EMPTY_BYTES = b""
cdef object _VERSION_MISMATCH = bytes([_VERSION])


# =================================================================================
# Reading helpers
# =================================================================================


cdef inline unsigned int _u16(const unsigned char* p) noexcept nogil:
    # Big-endian 16-bit field; the caller checked that 2 bytes are there.
    return (<unsigned int>p[0] << 8) | p[1]


cdef inline unsigned long _u32(const unsigned char* p) noexcept nogil:
    # Big-endian 32-bit field; the caller checked that 4 bytes are there.
    return ((<unsigned long>p[0] << 24) | (<unsigned long>p[1] << 16)
            | (<unsigned long>p[2] << 8) | <unsigned long>p[3])


cdef inline Py_ssize_t _pad4(Py_ssize_t n) noexcept nogil:
    # Round up to a multiple of 4: every SOCKS 6 field is 4-byte aligned.
    return (n + 3) & ~(<Py_ssize_t>3)


cdef inline object _bytes(const unsigned char* p, Py_ssize_t n):
    # Cast: PyBytes_FromStringAndSize takes char*; it copies n bytes from p.
    return PyBytes_FromStringAndSize(<const char*>p, n)


cdef Py_ssize_t _start(object offset, Py_ssize_t size) except -1:
    """Check ``offset`` against the buffer like the reference's ``_view``."""
    # Clamped on overflow: a huge int is just as out of range.
    cdef Py_ssize_t start = PyNumber_AsSsize_t(offset, NULL)
    if start < 0 or start > size:
        raise WireError(f"offset {offset} is out of range", None)
    return start


cdef inline int _acquire(object data, Py_buffer* view) except -1:
    # PyBUF_SIMPLE: the contiguous bytes of any exporter, whatever its format
    # (the reference's memoryview(data).cast("B")); no copy. A non-buffer keeps
    # its TypeError; a non-contiguous buffer is the reference's WireError.
    if s6_get_buffer(data, view, PyBUF_SIMPLE) == 0:
        return 0
    if PyErr_ExceptionMatches(BufferError):
        PyErr_Clear()
        raise WireError("data is not a contiguous buffer", None)
    return -1  # the exception set by PyObject_GetBuffer propagates


cdef int _check_options_length(unsigned int options_length, object max_options_length) except -1:
    # D6 / REQ-03: refuse before buffering the options. Every option is a
    # multiple of 4 long (section "SOCKS Options"), so their sum must be too.
    cdef int overflow = 0
    cdef long long maximum
    cdef bint exceeds
    if type(max_options_length) is int:
        maximum = PyLong_AsLongLongAndOverflow(max_options_length, &overflow)
        exceeds = overflow < 0 or (overflow == 0 and options_length > maximum)
    else:
        exceeds = options_length > max_options_length
    if exceeds:
        raise WireError(f"options length {options_length} exceeds {max_options_length}")
    if options_length & 3:
        raise WireError(f"options length {options_length} is not a multiple of 4")
    return 0


cdef object _address_type(unsigned int atyp):
    address_type = _member(_ADDRESS_TYPES, atyp)
    if address_type is None:
        raise WireError(f"address type {atyp} is not supported", _ADDRESS_TYPE_NOT_SUPPORTED)
    return address_type


cdef inline bint _padding_is_zero(const unsigned char* field, Py_ssize_t name_length) noexcept nogil:
    """D2: the bytes after a name up to the field's 4-byte boundary are NULs."""
    cdef Py_ssize_t i
    for i in range(1 + name_length, _pad4(1 + name_length)):
        if field[i] != 0:
            return False
    return True


cdef str _decode_name(const unsigned char* field):
    # field points at the length byte of a whole name field (padding included).
    # D2: strip trailing NULs (draft-12 counts padding in the length byte);
    # anything left that is empty or holds a NUL is malformed; then "skip NULs
    # up to the next 4-byte boundary": anything else there is malformed; then UTF-8.
    cdef Py_ssize_t name_length = field[0]
    cdef Py_ssize_t n = name_length
    cdef const unsigned char* p = field + 1
    while n > 0 and p[n - 1] == 0:
        n -= 1
    if n == 0:
        raise WireError("domain name is empty")
    if memchr(p, 0, n) != NULL:
        raise WireError("domain name contains a nul byte")
    if not _padding_is_zero(field, name_length):
        raise WireError("domain name padding is not zero")
    try:
        # Cast: the C API takes char*; strict decoding, as bytes.decode("utf-8").
        return PyUnicode_DecodeUTF8(<const char*>p, n, NULL)
    except UnicodeDecodeError:
        raise WireError("domain name is not valid utf-8") from None


cdef inline Py_ssize_t _put_decimal(char* out, unsigned int value) noexcept nogil:
    # 0-255 in decimal without leading zeros, as str(int); returns the digits written.
    if value >= 100:
        out[0] = <char>(48 + value // 100)
        out[1] = <char>(48 + (value // 10) % 10)
        out[2] = <char>(48 + value % 10)
        return 3
    if value >= 10:
        out[0] = <char>(48 + value // 10)
        out[1] = <char>(48 + value % 10)
        return 2
    out[0] = <char>(48 + value)
    return 1


cdef str _ipv4_text(const unsigned char* p):
    # The reference's ".".join(map(str, four_bytes)).
    cdef char text[16]
    cdef Py_ssize_t n = _put_decimal(text, p[0])
    cdef int i
    for i in range(1, 4):
        text[n] = b"."
        n += 1
        n += _put_decimal(text + n, p[i])
    return PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, text, n)


cdef str _ipv6_text(const unsigned char* p):
    # str(ipaddress.IPv6Address(packed)): lowercase hextets without leading
    # zeros, the longest run (first on ties) of 2+ zero hextets as "::".
    cdef unsigned int hextets[8]
    cdef char text[40]
    cdef const char* digits = b"0123456789abcdef"
    cdef int i, shift, best_start = -1, best_len = 0, run_start = -1, run_len = 0
    cdef Py_ssize_t n = 0
    cdef bint started
    for i in range(8):
        hextets[i] = _u16(p + 2 * i)
    # IPv4-mapped (::ffff:0:0/96): Python 3.13 prints these as a dotted quad,
    # older versions as hextets; let ipaddress decide so both twins agree.
    if hextets[0] == 0 and hextets[1] == 0 and hextets[2] == 0 and hextets[3] == 0 \
            and hextets[4] == 0 and hextets[5] == 0xFFFF:
        return str(ipaddress.IPv6Address(_bytes(p, _IPV6_LENGTH)))
    for i in range(8):
        if hextets[i] == 0:
            run_len += 1
            if run_start == -1:
                run_start = i
            if run_len > best_len:
                best_len = run_len
                best_start = run_start
        else:
            run_len = 0
            run_start = -1
    if best_len < 2:
        best_start = -1
    i = 0
    while i < 8:
        if i == best_start:
            text[n] = b":"
            text[n + 1] = b":"
            n += 2
            i += best_len
            continue
        if n > 0 and text[n - 1] != b":":
            text[n] = b":"
            n += 1
        started = False
        for shift in range(12, -1, -4):
            if started or (hextets[i] >> shift) & 0xF or shift == 0:
                text[n] = digits[(hextets[i] >> shift) & 0xF]
                n += 1
                started = True
        i += 1
    return PyUnicode_FromKindAndData(PyUnicode_1BYTE_KIND, text, n)


cdef inline str _decode_ip(const unsigned char* p, unsigned int atyp):
    if atyp == _ATYP_IPV4:
        return _ipv4_text(p)
    return _ipv6_text(p)


cdef inline str _decode_address(const unsigned char* p, unsigned int atyp):
    """Decode a complete address field at p (its length already checked)."""
    if atyp == _ATYP_DOMAIN:
        return _decode_name(p)
    return _decode_ip(p, atyp)


# =================================================================================
# Options (section "SOCKS Options")
# =================================================================================


cdef int _expect_length(unsigned int kind, Py_ssize_t length, Py_ssize_t expected) except -1:
    if length != expected:
        raise WireError(f"option kind {kind} has length {length}, expected {expected}")
    return 0


cdef int _expect_min_length(unsigned int kind, Py_ssize_t length, Py_ssize_t minimum) except -1:
    if length < minimum:
        raise WireError(f"option kind {kind} has length {length}, expected at least {minimum}")
    return 0


cdef inline bint _known_stack_key(unsigned int key) noexcept nogil:
    return (key == _SC_IP_TOS or key == _SC_HAPPY_EYEBALLS or key == _SC_TTL
            or key == _SC_NO_FRAGMENTATION or key == _SC_TFO or key == _SC_MULTIPATH
            or key == _SC_LISTEN_BACKLOG or key == _SC_UDP_ERROR or key == _SC_PORT_PARITY)


cdef inline bint _known_kind(unsigned long kind) noexcept nogil:
    return 1 <= kind <= 15 and kind != 7


cdef inline bint _stack_value_defined(unsigned int key, unsigned int b6, unsigned int b7) noexcept nogil:
    """Whether draft-11 defines the 2 value bytes of the Stack option key (reference twin)."""
    if key == _SC_HAPPY_EYEBALLS or key == _SC_NO_FRAGMENTATION or key == _SC_MULTIPATH \
            or key == _SC_UDP_ERROR:
        return b6 == 1 or b6 == 2  # Availability
    if key == _SC_PORT_PARITY:
        return b6 <= 2 and b7 <= 1  # Parity none/even/odd, Reserve 0/1
    # IP TOS, TTL (a byte), TFO payload size, listen backlog (16 bits): any value.
    return True


cdef object _decode_stack(const unsigned char* p, Py_ssize_t length):
    # Section "Stack options": byte 4 is Leg (top 2 bits) | Level (low 6 bits),
    # byte 5 the Code. Leg 0, a (Level, Code) draft-11 does not define, a length
    # other than its figure's 8, or a value it does not define (availability not
    # 1/2, parity > 2, reserve > 1) make an unsupported option, which "MUST be
    # silently ignored": kept opaque so the caller can ignore it (REQ-06).
    # p points at the option's Kind; the walker checked that length bytes are there.
    _expect_min_length(_KIND_STACK, length, _STACK_OPTION_LENGTH)
    cdef unsigned int leg_value = p[4] >> _STACK_LEG_SHIFT
    cdef unsigned int level = p[4] & _STACK_LEVEL_MASK
    cdef unsigned int code = p[5]
    cdef unsigned int key = (level << 8) | code
    # length >= 8 was checked: bytes 6 and 7 are there.
    cdef unsigned int b6 = p[6], b7 = p[7]
    leg = _member(_STACK_LEGS, leg_value)
    if leg is None or not _known_stack_key(key) or length != _STACK_OPTION_LENGTH \
            or not _stack_value_defined(key, b6, b7):
        return _new4(_L_UNKNOWN_STACK, PyLong_FromLong(leg_value), PyLong_FromLong(level),
                     PyLong_FromLong(code), _bytes(p + 6, length - 6))
    if key == _SC_IP_TOS:
        return _new2(_L_IPTOS, leg, PyLong_FromLong(b6))
    if key == _SC_HAPPY_EYEBALLS:
        return _new2(_L_HAPPY_EYEBALLS, leg, _member(_AVAILABILITY, b6))
    if key == _SC_TTL:
        return _new2(_L_TTL, leg, PyLong_FromLong(b6))
    if key == _SC_NO_FRAGMENTATION:
        return _new2(_L_NO_FRAGMENTATION, leg, _member(_AVAILABILITY, b6))
    if key == _SC_TFO:
        return _new2(_L_TFO, leg, PyLong_FromLong(_u16(p + 6)))
    if key == _SC_MULTIPATH:
        return _new2(_L_MULTIPATH, leg, _member(_AVAILABILITY, b6))
    if key == _SC_LISTEN_BACKLOG:
        return _new2(_L_LISTEN_BACKLOG, leg, PyLong_FromLong(_u16(p + 6)))
    if key == _SC_UDP_ERROR:
        return _new2(_L_UDP_ERROR, leg, _member(_AVAILABILITY, b6))
    # _SC_PORT_PARITY
    return _new3(_L_PORT_PARITY, leg, _member(_PARITIES, b6), b7 == 1)


cdef object _decode_option(const unsigned char* p, unsigned int kind, Py_ssize_t length,
                           unsigned int placed):
    """One option of a known or unknown kind; p points at its Kind, length bytes present.

    placed: bit mask of the known kinds this message may carry; any other kind
    is kept opaque (REQ-06).
    """
    cdef unsigned int initial_data_length
    cdef unsigned long size
    cdef Py_ssize_t n
    if kind > 15 or not (placed >> kind) & 1:
        return _new2(_L_UNKNOWN, PyLong_FromLong(kind), _bytes(p + 4, length - 4))
    if kind == _KIND_STACK:
        return _decode_stack(p, length)
    if kind == _KIND_AUTH_DATA:
        _expect_min_length(kind, length, _MIN_DATA_OPTION_LENGTH)
        # The method's data keeps its padding: only the method knows its own length.
        return _new2(_L_AUTH_DATA, PyLong_FromLong(p[4]), _bytes(p + 5, length - 5))
    if kind == _KIND_SESSION_ID:
        # Section "Session initiation": the ID MUST NOT be empty; the option
        # length check already makes it a multiple of 4.
        _expect_min_length(kind, length, _MIN_DATA_OPTION_LENGTH)
        return _new1(_L_SESSION_ID, _bytes(p + 4, length - 4))
    if kind == _KIND_ADVERTISEMENT:
        _expect_min_length(kind, length, _MIN_DATA_OPTION_LENGTH)
        initial_data_length = _u16(p + 4)
        if initial_data_length > _MAX_INITIAL_DATA_LENGTH:  # D12
            raise WireError(
                f"initial data length {initial_data_length} exceeds {_MAX_INITIAL_DATA_LENGTH}"
            )
        # The padding is zeroes, the same byte as method 0; a client never
        # advertises method 0 (AUTH-08), so every trailing zero is padding.
        n = length
        while n > 6 and p[n - 1] == 0:
            n -= 1
        methods = tuple([PyLong_FromLong(p[i]) for i in range(6, n)])
        return _new2(_L_ADVERTISEMENT, PyLong_FromLong(initial_data_length), methods)
    if kind == _KIND_SELECTION:
        _expect_length(kind, length, _METHOD_SELECTION_LENGTH)
        return _new1(_L_SELECTION, PyLong_FromLong(p[4]))
    if kind == _KIND_SESSION_REQUEST:
        _expect_length(kind, length, _EMPTY_OPTION_LENGTH)
        return _SESSION_REQUEST
    if kind == _KIND_SESSION_OK:
        _expect_length(kind, length, _EMPTY_OPTION_LENGTH)
        return _SESSION_OK
    if kind == _KIND_SESSION_INVALID:
        _expect_length(kind, length, _EMPTY_OPTION_LENGTH)
        return _SESSION_INVALID
    if kind == _KIND_SESSION_TEARDOWN:
        _expect_length(kind, length, _EMPTY_OPTION_LENGTH)
        return _SESSION_TEARDOWN
    if kind == _KIND_IDEMPOTENCE_REQUEST:
        # A request for 0 is valid data; the proxy ignores it (D15).
        _expect_length(kind, length, _U32_OPTION_LENGTH)
        return _new1(_L_IDEMPOTENCE_REQUEST, PyLong_FromUnsignedLong(_u32(p + 4)))
    if kind == _KIND_IDEMPOTENCE_WINDOW:
        _expect_length(kind, length, _WINDOW_OPTION_LENGTH)
        size = _u32(p + 8)
        # "Window sizes MUST be less than 2^31. Window sizes MUST NOT be 0."
        if size == 0 or size > <unsigned long>_MAX_WINDOW_SIZE:
            raise WireError(f"idempotence window size {size} is out of range")
        return _new2(_L_IDEMPOTENCE_WINDOW, PyLong_FromUnsignedLong(_u32(p + 4)),
                     PyLong_FromUnsignedLong(size))
    if kind == _KIND_IDEMPOTENCE_EXPENDITURE:
        # D3: the figure says 4, the text says 8; only 8 carries the token.
        _expect_length(kind, length, _U32_OPTION_LENGTH)
        return _new1(_L_IDEMPOTENCE_EXPENDITURE, PyLong_FromUnsignedLong(_u32(p + 4)))
    if kind == _KIND_IDEMPOTENCE_ACCEPTED:
        _expect_length(kind, length, _EMPTY_OPTION_LENGTH)
        return _IDEMPOTENCE_ACCEPTED
    if kind == _KIND_IDEMPOTENCE_REJECTED:
        _expect_length(kind, length, _EMPTY_OPTION_LENGTH)
        return _IDEMPOTENCE_REJECTED
    return _new2(_L_UNKNOWN, PyLong_FromLong(kind), _bytes(p + 4, length - 4))


cdef tuple _walk_options(const unsigned char* p, Py_ssize_t n, unsigned int placed):
    # D8 / REQ-05: every Length is >= 4, a multiple of 4, and stays inside
    # Options Length; unknown kinds, and known kinds outside placed (the kinds
    # this message may carry), are skipped by Length, kept opaque (REQ-06).
    # p points at the first option; the caller checked that n bytes are there.
    cdef Py_ssize_t pos = 0
    cdef unsigned int kind, length
    if n == 0:
        return ()
    options = []
    while pos < n:
        if n - pos < _OPTION_HEADER_LENGTH:
            raise WireError("option header runs past options length")
        kind = _u16(p + pos)
        length = _u16(p + pos + 2)
        if length < _OPTION_HEADER_LENGTH:
            raise WireError(f"option length {length} is less than 4")
        if length & 3:
            raise WireError(f"option length {length} is not a multiple of 4")
        if length > n - pos:
            raise WireError(f"option length {length} runs past options length")
        options.append(_decode_option(p + pos, kind, length, placed))
        pos += length
    return PyList_AsTuple(options)


cdef unsigned int _placed_kinds(object context) except 0:
    if context is None:
        return _ALL_KINDS
    if context is Request:
        return _REQUEST_KINDS
    if context is AuthReply:
        return _AUTH_REPLY_KINDS
    if context is OperationReply:
        return _OPERATION_REPLY_KINDS
    raise WireError("options context is not Request, AuthReply or OperationReply", None)


def decode_options(data, offset=0, length=-1, context=None):
    """Decode a run of options.

    Twin of ``socks6fast.proto._codec_py.decode_options``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef Py_buffer view
    cdef Py_ssize_t start, available, n
    cdef unsigned int placed = _placed_kinds(context)
    _acquire(data, &view)
    try:
        start = _start(offset, view.len)
        available = view.len - start
        if length == -1:
            n = available
        elif length < 0 or length > available:
            raise WireError(f"options length {length} runs past the end of the data")
        else:
            n = length
        # Cast: the buffer's bytes; start + n <= view.len was checked above.
        return _walk_options(<const unsigned char*>view.buf + start, n, placed)
    finally:
        PyBuffer_Release(&view)


# =================================================================================
# Request / Operation Reply (same layout, section "Requests")
# =================================================================================


cdef tuple _parse_addressed(
    const unsigned char* p, Py_ssize_t available, object max_options_length, bint is_request
):
    # p points at the message's first byte; available bytes follow it.
    cdef Py_ssize_t smallest = _ADDRESSED_HEADER_LENGTH + _MIN_ADDRESS_FIELD_LENGTH
    cdef Py_ssize_t field_length, total, options_start
    cdef unsigned int code, options_length, atyp, name_length
    if available < 1:
        return None, smallest - available
    if p[0] != _VERSION:
        raise WireError(f"version {p[0]} is not 6", None)
    if available < 2:
        return None, smallest - available
    code = p[1]
    if is_request:
        message_code = _member(_COMMANDS, code)
        if message_code is None:
            # Unknown Command Code: kept as a plain int, as the reference does (CMD-06).
            message_code = code
    else:
        message_code = _member(_REPLY_CODES, code)
        if message_code is None:
            raise WireError(f"reply code {code} is unknown")
    if available < 4:
        return None, smallest - available
    options_length = _u16(p + 2)
    _check_options_length(options_length, max_options_length)
    smallest += options_length
    if available < _ADDRESSED_HEADER_LENGTH:
        return None, smallest - available
    atyp = p[7]
    address_type = _address_type(atyp)
    if atyp == _ATYP_IPV4:
        field_length = _IPV4_LENGTH
    elif atyp == _ATYP_IPV6:
        field_length = _IPV6_LENGTH
    else:
        if available < _ADDRESSED_HEADER_LENGTH + 1:
            return None, smallest - available
        name_length = p[_ADDRESSED_HEADER_LENGTH]
        if name_length == 0:
            raise WireError("domain name is empty")
        field_length = _pad4(1 + name_length)
    total = _ADDRESSED_HEADER_LENGTH + field_length + options_length
    options_start = _ADDRESSED_HEADER_LENGTH + field_length
    if available < options_start:
        return None, total - available
    # The address is decoded once its whole field (D2 padding included) is here.
    address = _decode_address(p + _ADDRESSED_HEADER_LENGTH, atyp)
    if available < total:
        return None, total - available
    port = PyLong_FromLong(_u16(p + 4))
    options = _walk_options(p + options_start, options_length,
                            _REQUEST_KINDS if is_request else _OPERATION_REPLY_KINDS)
    if is_request:
        return _new5(_L_REQUEST, message_code, address_type, address, port, options), total
    return _new5(_L_OPERATION_REPLY, message_code, address_type, address, port, options), total


def decode_request(data, offset=0, max_options_length=MAX_OPTIONS_LENGTH):
    """Decode a Request (figure "SOCKS 6 Request") incrementally.

    Twin of ``socks6fast.proto._codec_py.decode_request``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef Py_buffer view
    cdef Py_ssize_t start
    _acquire(data, &view)
    try:
        start = _start(offset, view.len)
        # Cast: the buffer's bytes, from a checked start.
        return _parse_addressed(<const unsigned char*>view.buf + start, view.len - start,
                                max_options_length, True)
    finally:
        PyBuffer_Release(&view)


def decode_operation_reply(data, offset=0, max_options_length=MAX_OPTIONS_LENGTH):
    """Decode an Operation Reply (figure "SOCKS 6 Operation Reply") incrementally.

    Twin of ``socks6fast.proto._codec_py.decode_operation_reply``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef Py_buffer view
    cdef Py_ssize_t start
    _acquire(data, &view)
    try:
        start = _start(offset, view.len)
        # Cast: the buffer's bytes, from a checked start.
        return _parse_addressed(<const unsigned char*>view.buf + start, view.len - start,
                                max_options_length, False)
    finally:
        PyBuffer_Release(&view)


cdef tuple _parse_auth_reply(const unsigned char* p, Py_ssize_t available, object max_options_length):
    # p points at the message's first byte; available bytes follow it.
    cdef Py_ssize_t smallest = _AUTH_REPLY_HEADER_LENGTH, total
    cdef unsigned int code, options_length
    if available < 1:
        return None, smallest - available
    if p[0] != _VERSION:
        raise WireError(f"version {p[0]} is not 6", None)
    if available < 2:
        return None, smallest - available
    code = p[1]
    reply_type = _member(_AUTH_REPLY_TYPES, code)
    if reply_type is None:
        raise WireError(f"authentication reply type {code} is unknown")
    if available < 4:
        return None, smallest - available
    options_length = _u16(p + 2)
    _check_options_length(options_length, max_options_length)
    total = _AUTH_REPLY_HEADER_LENGTH + options_length
    if available < total:
        return None, total - available
    options = _walk_options(p + _AUTH_REPLY_HEADER_LENGTH, options_length, _AUTH_REPLY_KINDS)
    return _new2(_L_AUTH_REPLY, reply_type, options), total


def decode_auth_reply(data, offset=0, max_options_length=MAX_OPTIONS_LENGTH):
    """Decode an Authentication Reply (figure "SOCKS 6 Authentication Reply") incrementally.

    Twin of ``socks6fast.proto._codec_py.decode_auth_reply``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef Py_buffer view
    cdef Py_ssize_t start
    _acquire(data, &view)
    try:
        start = _start(offset, view.len)
        # Cast: the buffer's bytes, from a checked start.
        return _parse_auth_reply(<const unsigned char*>view.buf + start, view.len - start,
                                 max_options_length)
    finally:
        PyBuffer_Release(&view)


# =================================================================================
# UDP association messages and the Datagram Header (section "Handling UDP ASSOCIATE")
# =================================================================================


cdef Py_ssize_t parse_datagram_header(
    const unsigned char* data, Py_ssize_t length, DatagramHeaderView* out
) noexcept nogil:
    """Parse the Datagram Header at data[0:length]; header length, or DGRAM_E_*.

    Same checks, same order as the reference's decode_datagram_header, except
    that a name is not checked for UTF-8 (the caller decodes it). Message Length
    larger than ``length`` is not an error here (UDP-05 is the caller's).
    """
    cdef Py_ssize_t header_length
    cdef unsigned int message_length, atyp, name_length = 0
    cdef Py_ssize_t n
    if length < 1:
        return DGRAM_E_TRUNCATED
    if data[0] != _VERSION:
        return DGRAM_E_VERSION
    if length < 2:
        return DGRAM_E_TRUNCATED
    if data[1] != _MSG_DATAGRAM:
        return DGRAM_E_TYPE
    if length < _ASSOC_PREFIX_LENGTH:
        return DGRAM_E_TRUNCATED
    message_length = _u16(data + 2)
    out.message_length = message_length
    if message_length < _MIN_DGRAM_HEADER_LENGTH:
        out.minimum_length = _MIN_DGRAM_HEADER_LENGTH
        return DGRAM_E_LENGTH
    # D5: the Datagram Header's order is ATYP, Padding, Port, then the address.
    if length < _ASSOC_HEADER_LENGTH + 1:
        return DGRAM_E_TRUNCATED
    atyp = data[_ASSOC_HEADER_LENGTH]
    out.address_type = atyp
    if atyp == _ATYP_IPV4:
        header_length = DGRAM_ADDRESS_OFFSET + _IPV4_LENGTH
    elif atyp == _ATYP_IPV6:
        header_length = DGRAM_ADDRESS_OFFSET + _IPV6_LENGTH
    elif atyp == _ATYP_DOMAIN:
        if length < DGRAM_ADDRESS_OFFSET + 1:
            return DGRAM_E_TRUNCATED
        name_length = data[DGRAM_ADDRESS_OFFSET]
        if name_length == 0:
            return DGRAM_E_NAME_EMPTY
        header_length = DGRAM_ADDRESS_OFFSET + _pad4(1 + name_length)
    else:
        return DGRAM_E_ADDRESS_TYPE
    if message_length < header_length:
        out.minimum_length = <unsigned int>header_length
        return DGRAM_E_LENGTH
    if length < header_length:
        return DGRAM_E_TRUNCATED
    if atyp == _ATYP_DOMAIN:
        # D2: trailing NULs of the name's bytes are padding; after them "skip
        # NULs up to the next 4-byte boundary": a non-NUL there is malformed
        # (an unpadded peer's first payload bytes would otherwise be lost).
        n = name_length
        while n > 0 and data[DGRAM_ADDRESS_OFFSET + n] == 0:
            n -= 1
        if n == 0:
            return DGRAM_E_NAME_EMPTY
        if memchr(data + DGRAM_ADDRESS_OFFSET + 1, 0, n) != NULL:
            return DGRAM_E_NAME_NUL
        if not _padding_is_zero(data + DGRAM_ADDRESS_OFFSET, name_length):
            return DGRAM_E_NAME_PADDING
        out.address = data + DGRAM_ADDRESS_OFFSET + 1
        out.address_length = n
    else:
        out.address = data + DGRAM_ADDRESS_OFFSET
        out.address_length = header_length - DGRAM_ADDRESS_OFFSET
    out.association_id = data + _ASSOC_PREFIX_LENGTH
    out.port = _u16(data + _ASSOC_HEADER_LENGTH + 2)
    out.header_length = header_length
    return header_length


cdef object _header_from_view(DatagramHeaderView* hv):
    """The DatagramHeader object of a successful parse_datagram_header."""
    cdef str address
    if hv.address_type == _ATYP_IPV4:
        address = _ipv4_text(hv.address)
        address_type = _IPV4_MEMBER
    elif hv.address_type == _ATYP_IPV6:
        address = _ipv6_text(hv.address)
        address_type = _IPV6_MEMBER
    else:
        try:
            # Cast: the C API takes char*; the name's NUL checks were done nogil.
            address = PyUnicode_DecodeUTF8(<const char*>hv.address, hv.address_length, NULL)
        except UnicodeDecodeError:
            raise WireError("domain name is not valid utf-8") from None
        address_type = _DOMAIN_MEMBER
    return _new5(
        _L_DATAGRAM_HEADER,
        _bytes(hv.association_id, _ASSOCIATION_ID_LENGTH),
        address_type,
        address,
        PyLong_FromLong(hv.port),
        PyLong_FromLong(hv.message_length),
    )


cdef int _raise_datagram_error(Py_ssize_t result, const unsigned char* p, DatagramHeaderView* hv) except -1:
    """Raise the reference's WireError for a parse_datagram_header failure (not TRUNCATED)."""
    if result == DGRAM_E_VERSION:
        raise WireError(f"version {p[0]} is not 6", None)
    if result == DGRAM_E_TYPE:
        raise WireError(f"message type {p[1]} is not a datagram")
    if result == DGRAM_E_LENGTH:
        raise WireError(f"message length {hv.message_length} is less than {hv.minimum_length}")
    if result == DGRAM_E_ADDRESS_TYPE:
        raise WireError(f"address type {hv.address_type} is not supported", _ADDRESS_TYPE_NOT_SUPPORTED)
    if result == DGRAM_E_NAME_EMPTY:
        raise WireError("domain name is empty")
    if result == DGRAM_E_NAME_NUL:
        raise WireError("domain name contains a nul byte")
    if result == DGRAM_E_NAME_PADDING:
        raise WireError("domain name padding is not zero")
    raise WireError("datagram header is truncated")


def decode_datagram_header(data, offset=0):
    """Decode the Datagram Header at the start of a whole UDP/DTLS datagram.

    Twin of ``socks6fast.proto._codec_py.decode_datagram_header``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef Py_buffer view
    cdef Py_ssize_t start, result
    cdef DatagramHeaderView hv
    cdef const unsigned char* p
    _acquire(data, &view)
    try:
        start = _start(offset, view.len)
        # Cast: the buffer's bytes, from a checked start.
        p = <const unsigned char*>view.buf + start
        result = parse_datagram_header(p, view.len - start, &hv)
        if result < 0:
            _raise_datagram_error(result, p, &hv)
        return _header_from_view(&hv), result
    finally:
        PyBuffer_Release(&view)


cdef object _error_address_type(unsigned int atyp):
    # Section "Reporting ICMP Errors": both address types are IPv4 or IPv6.
    address_type = _address_type(atyp)
    if atyp == _ATYP_DOMAIN:
        raise WireError("address type 3 is not allowed in a datagram error", _ADDRESS_TYPE_NOT_SUPPORTED)
    return address_type


cdef inline Py_ssize_t _ip_length(unsigned int atyp) noexcept nogil:
    return _IPV4_LENGTH if atyp == _ATYP_IPV4 else _IPV6_LENGTH


cdef object _parse_datagram_error(const unsigned char* p, Py_ssize_t available, unsigned int message_length):
    """A Datagram Error whose first 4 bytes were checked; None if more bytes are needed."""
    cdef Py_ssize_t reporter_pos, total
    cdef unsigned int atyp, reporter_atyp, code
    if available < _ASSOC_HEADER_LENGTH + 1:
        return None
    atyp = p[_ASSOC_HEADER_LENGTH]
    address_type = _error_address_type(atyp)
    reporter_pos = DGRAM_ADDRESS_OFFSET + _ip_length(atyp)
    if message_length < reporter_pos + _REPORTER_PREFIX_LENGTH + _IPV4_LENGTH:
        raise WireError(
            f"message length {message_length} is less than "
            f"{reporter_pos + _REPORTER_PREFIX_LENGTH + _IPV4_LENGTH}"
        )
    if available < reporter_pos + 1:
        return None
    reporter_atyp = p[reporter_pos]
    reporter_type = _error_address_type(reporter_atyp)
    total = reporter_pos + _REPORTER_PREFIX_LENGTH + _ip_length(reporter_atyp)
    # Over a stream the Message Length frames the message: it must be exact.
    if message_length != total:
        raise WireError(f"message length {message_length} is not {total}")
    if available < reporter_pos + 2:
        return None
    code = p[reporter_pos + 1]
    error_code = _member(_DGRAM_ERROR_CODES, code)
    if error_code is None:
        raise WireError(f"datagram error code {code} is unknown")
    if available < total:
        return None
    obj = s6_alloc(_L_DATAGRAM_ERROR.type)
    s6_slot_init(obj, _L_DATAGRAM_ERROR.off[0], _bytes(p + _ASSOC_PREFIX_LENGTH, _ASSOCIATION_ID_LENGTH))
    s6_slot_init(obj, _L_DATAGRAM_ERROR.off[1], address_type)
    s6_slot_init(obj, _L_DATAGRAM_ERROR.off[2], _decode_ip(p + DGRAM_ADDRESS_OFFSET, atyp))
    s6_slot_init(obj, _L_DATAGRAM_ERROR.off[3], PyLong_FromLong(_u16(p + _ASSOC_HEADER_LENGTH + 2)))
    s6_slot_init(obj, _L_DATAGRAM_ERROR.off[4], reporter_type)
    s6_slot_init(obj, _L_DATAGRAM_ERROR.off[5],
                 _decode_ip(p + reporter_pos + _REPORTER_PREFIX_LENGTH, reporter_atyp))
    s6_slot_init(obj, _L_DATAGRAM_ERROR.off[6], error_code)
    return obj


cdef tuple _parse_association_message(const unsigned char* p, Py_ssize_t available):
    # p points at the message's first byte; available bytes follow it.
    cdef unsigned int message_type, message_length
    cdef Py_ssize_t result
    cdef DatagramHeaderView hv
    if available < 1:
        return None, _ASSOC_PREFIX_LENGTH - available
    if p[0] != _VERSION:
        raise WireError(f"version {p[0]} is not 6", None)
    if available < 2:
        return None, _ASSOC_PREFIX_LENGTH - available
    message_type = p[1]
    if not _MSG_INIT <= message_type <= _MSG_ERROR:
        raise WireError(f"message type {message_type} is unknown")
    if available < _ASSOC_PREFIX_LENGTH:
        return None, _ASSOC_PREFIX_LENGTH - available
    message_length = _u16(p + 2)
    if message_type == _MSG_DATAGRAM:
        # The Datagram Header checks are decode_datagram_header's; only a
        # missing byte means "wait" here instead of "truncated".
        result = parse_datagram_header(p, available, &hv)
        if result == DGRAM_E_TRUNCATED:
            return None, message_length - available
        if result < 0:
            _raise_datagram_error(result, p, &hv)
        header = _header_from_view(&hv)
        if available < message_length:
            return None, message_length - available
        payload = _bytes(p + result, message_length - result)
        return _new2(_L_DATAGRAM, header, payload), message_length
    if message_type == _MSG_ERROR:
        if message_length < _MIN_DGRAM_ERROR_LENGTH:
            raise WireError(f"message length {message_length} is less than {_MIN_DGRAM_ERROR_LENGTH}")
        error = _parse_datagram_error(p, available, message_length)
        if error is None:
            return None, message_length - available
        return error, message_length
    # Association Initialization / Confirmation: "Message Length = 12".
    if message_length != _ASSOCIATION_MESSAGE_LENGTH:
        raise WireError(f"message length {message_length} is not 12")
    if available < _ASSOCIATION_MESSAGE_LENGTH:
        return None, _ASSOCIATION_MESSAGE_LENGTH - available
    association_id = _bytes(p + _ASSOC_PREFIX_LENGTH, _ASSOCIATION_ID_LENGTH)
    if message_type == _MSG_INIT:
        return _new1(_L_ASSOCIATION_INIT, association_id), _ASSOCIATION_MESSAGE_LENGTH
    return _new1(_L_ASSOCIATION_CONFIRMATION, association_id), _ASSOCIATION_MESSAGE_LENGTH


def decode_association_message(data, offset=0):
    """Decode one UDP association message from the TCP stream, incrementally.

    Twin of ``socks6fast.proto._codec_py.decode_association_message``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef Py_buffer view
    cdef Py_ssize_t start
    _acquire(data, &view)
    try:
        start = _start(offset, view.len)
        # Cast: the buffer's bytes, from a checked start.
        return _parse_association_message(<const unsigned char*>view.buf + start, view.len - start)
    finally:
        PyBuffer_Release(&view)


# =================================================================================
# Encoding
# =================================================================================


cdef struct _Out:
    # A growable output buffer: starts in `small` (on the caller's stack),
    # moves to the heap when it outgrows it. Free with _out_free.
    unsigned char* data
    Py_ssize_t length
    Py_ssize_t capacity
    unsigned char small[512]


cdef inline void _out_init(_Out* w) noexcept nogil:
    w.data = w.small
    w.length = 0
    w.capacity = sizeof(w.small)


cdef inline void _out_free(_Out* w) noexcept:
    if w.data != w.small:
        PyMem_Free(w.data)


cdef unsigned char* _out_take(_Out* w, Py_ssize_t n) except NULL:
    """Room for n more bytes at the end of w; returns where to write them."""
    cdef Py_ssize_t capacity
    cdef unsigned char* grown
    if w.capacity - w.length < n:
        capacity = w.capacity * 2
        while capacity - w.length < n:
            capacity *= 2
        # Cast: PyMem_Malloc returns void*.
        grown = <unsigned char*>PyMem_Malloc(capacity)
        if grown == NULL:
            raise MemoryError()
        memcpy(grown, w.data, w.length)
        _out_free(w)
        w.data = grown
        w.capacity = capacity
    w.length += n
    return w.data + w.length - n


cdef inline void _put_u16(unsigned char* p, unsigned int value) noexcept nogil:
    p[0] = <unsigned char>(value >> 8)
    p[1] = <unsigned char>value


cdef inline void _put_u32(unsigned char* p, unsigned long value) noexcept nogil:
    p[0] = <unsigned char>(value >> 24)
    p[1] = <unsigned char>(value >> 16)
    p[2] = <unsigned char>(value >> 8)
    p[3] = <unsigned char>value


cdef long long _check_int(object value, long long maximum, str what) except -1:
    # The reference's _check_int: any int (IntEnum included, bool refused) in 0..maximum.
    cdef int overflow = 0
    cdef long long result
    if isinstance(value, int) and type(value) is not bool:
        result = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 0 <= result <= maximum:
            return result
    raise LocalProtocolError(f"{what} is out of range")


cdef int _table_value(object value, tuple table) except -2:
    """The reference's _in_table: value's int value if it is in the table, else -1 (bool: -1)."""
    cdef int overflow = 0
    cdef long long result
    if isinstance(value, int) and type(value) is not bool:
        result = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow == 0 and 0 <= result < 256 and _member(table, <unsigned int>result) is not None:
            return <int>result
    return -1


cdef inline bint _is_buffer(object value):
    return isinstance(value, (bytes, bytearray, memoryview))


cdef int _push_option(_Out* w, unsigned int kind, object data, Py_ssize_t padding) except -1:
    """Kind, Length, then the bytes of data and padding NULs (data is bytes)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t length = _OPTION_HEADER_LENGTH + n + padding
    cdef unsigned char* out
    if length > _MAX_OPTION_LENGTH:
        raise LocalProtocolError("option is longer than 65535 bytes")
    out = _out_take(w, length)
    _put_u16(out, kind)
    _put_u16(out + 2, <unsigned int>length)
    # Cast: PyBytes_AS_STRING gives char*; n bytes are copied.
    memcpy(out + 4, <const unsigned char*>PyBytes_AS_STRING(data), n)
    memset(out + 4 + n, 0, padding)
    return 0


cdef int _stack_leg(object leg) except -1:
    cdef int leg_value = _table_value(leg, _STACK_LEGS)
    if leg_value < 0:
        raise LocalProtocolError("stack leg is out of range")
    return leg_value


cdef int _remote_leg(object leg) except -1:
    # Happy Eyeballs, TFO, Multipath, Listen Backlog, UDP Error and Port Parity:
    # their figures fix Leg = 2 (proxy-remote).
    cdef int leg_value = _stack_leg(leg)
    if leg_value != _LEG_PROXY_REMOTE:
        raise LocalProtocolError("stack option leg is not proxy-remote")
    return leg_value


cdef int _stack(_Out* w, int leg, unsigned int key, unsigned int b6, unsigned int b7) except -1:
    # Every Stack option draft-11 defines: Kind 1, Length 8, Leg|Level, Code, 2 bytes.
    cdef unsigned char* out = _out_take(w, _STACK_OPTION_LENGTH)
    _put_u16(out, _KIND_STACK)
    _put_u16(out + 2, _STACK_OPTION_LENGTH)
    out[4] = <unsigned char>((leg << _STACK_LEG_SHIFT) | (key >> 8))
    out[5] = <unsigned char>(key & 0xFF)
    out[6] = <unsigned char>b6
    out[7] = <unsigned char>b7
    return 0


cdef int _availability_value(object value) except -1:
    cdef int result = _table_value(value, _AVAILABILITY)
    if result < 0:
        raise LocalProtocolError("stack option availability is out of range")
    return result


cdef int _encode_option(_Out* w, object option) except -1:
    cdef _Layout L = <_Layout>_OPTION_LAYOUT_BY_TYPE.get(type(option))
    cdef bint exact = L is not None
    cdef long long value, size
    cdef int parity, code, leg
    cdef Py_ssize_t n
    cdef unsigned char* out
    if not exact:
        # A subclass of an option class: the reference's match/case is isinstance.
        for candidate in _OPTION_LAYOUTS:
            if isinstance(option, (<_Layout>candidate).cls):
                L = <_Layout>candidate
                break
        else:
            raise LocalProtocolError("not a socks 6 option")
    code = L.code
    if code <= _OPT_PORT_PARITY:
        # A Stack option draft-11 defines: its fields in wire order, Leg first.
        if code == _OPT_IPTOS or code == _OPT_TTL or code == _OPT_NO_FRAGMENTATION:
            leg = _stack_leg(_field(option, L, 0, "leg", exact))
        else:
            leg = _remote_leg(_field(option, L, 0, "leg", exact))
        if code == _OPT_IPTOS:
            value = _check_int(_field(option, L, 1, "tos", exact), 0xFF, "ip tos")
            _stack(w, leg, _SC_IP_TOS, <unsigned int>value, 0)
        elif code == _OPT_TTL:
            value = _check_int(_field(option, L, 1, "ttl", exact), 0xFF, "ttl")
            _stack(w, leg, _SC_TTL, <unsigned int>value, 0)
        elif code == _OPT_HAPPY_EYEBALLS:
            value = _availability_value(_field(option, L, 1, "availability", exact))
            _stack(w, leg, _SC_HAPPY_EYEBALLS, <unsigned int>value, 0)
        elif code == _OPT_NO_FRAGMENTATION:
            value = _availability_value(_field(option, L, 1, "availability", exact))
            _stack(w, leg, _SC_NO_FRAGMENTATION, <unsigned int>value, 0)
        elif code == _OPT_MULTIPATH:
            value = _availability_value(_field(option, L, 1, "availability", exact))
            _stack(w, leg, _SC_MULTIPATH, <unsigned int>value, 0)
        elif code == _OPT_UDP_ERROR:
            value = _availability_value(_field(option, L, 1, "availability", exact))
            _stack(w, leg, _SC_UDP_ERROR, <unsigned int>value, 0)
        elif code == _OPT_TFO:
            value = _check_int(_field(option, L, 1, "payload_size", exact), 0xFFFF, "tfo payload size")
            _stack(w, leg, _SC_TFO, <unsigned int>(value >> 8), <unsigned int>(value & 0xFF))
        elif code == _OPT_LISTEN_BACKLOG:
            value = _check_int(_field(option, L, 1, "backlog", exact), 0xFFFF, "listen backlog")
            _stack(w, leg, _SC_LISTEN_BACKLOG, <unsigned int>(value >> 8), <unsigned int>(value & 0xFF))
        else:  # _OPT_PORT_PARITY
            parity = _table_value(_field(option, L, 1, "parity", exact), _PARITIES)
            if parity < 0:
                raise LocalProtocolError("port parity is out of range")
            reserve = _field(option, L, 2, "reserve", exact)
            if not isinstance(reserve, bool):
                raise LocalProtocolError("port parity reserve is not a bool")
            _stack(w, leg, _SC_PORT_PARITY, <unsigned int>parity, 1 if reserve else 0)
    elif code == _OPT_UNKNOWN_STACK:
        _encode_unknown_stack(w, option, L, exact)
    elif code == _OPT_ADVERTISEMENT:
        _encode_advertisement(w, option, L, exact)
    elif code == _OPT_SELECTION:
        value = _check_int(_field(option, L, 0, "method", exact), 0xFF, "authentication method")
        _push_option(w, _KIND_SELECTION, bytes((value, 0, 0, 0)), 0)
    elif code == _OPT_AUTH_DATA:
        value = _check_int(_field(option, L, 0, "method", exact), 0xFF, "authentication method")
        data = _field(option, L, 1, "data", exact)
        if not _is_buffer(data):
            raise LocalProtocolError("authentication data is not bytes")
        body = bytes((value,)) + (data if type(data) is bytes else bytes(data))
        # Padding: "a minimally-sized sequence of zeroes".
        n = PyBytes_GET_SIZE(body)
        _push_option(w, _KIND_AUTH_DATA, body, _pad4(n) - n)
    elif code == _OPT_SESSION_ID:
        sid = _field(option, L, 0, "session_id", exact)
        if not _is_buffer(sid):
            raise LocalProtocolError("session id is not bytes")
        if type(sid) is not bytes:
            sid = bytes(sid)
        # Section "Session initiation": a multiple of 4, MUST NOT be empty.
        n = PyBytes_GET_SIZE(sid)
        if n == 0 or n & 3:
            raise LocalProtocolError("session id length is not a positive multiple of 4")
        _push_option(w, _KIND_SESSION_ID, sid, 0)
    elif code == _OPT_IDEMPOTENCE_REQUEST:
        value = _check_int(_field(option, L, 0, "window_size", exact), _U32_MAX, "idempotence window size")
        _push_u32_option(w, _KIND_IDEMPOTENCE_REQUEST, <unsigned long>value)
    elif code == _OPT_IDEMPOTENCE_WINDOW:
        value = _check_int(_field(option, L, 0, "base", exact), _U32_MAX, "idempotence window base")
        size = _check_int(_field(option, L, 1, "size", exact), _MAX_WINDOW_SIZE, "idempotence window size")
        if size == 0:
            raise LocalProtocolError("idempotence window size is out of range")
        out = _out_take(w, _WINDOW_OPTION_LENGTH)
        _put_u16(out, _KIND_IDEMPOTENCE_WINDOW)
        _put_u16(out + 2, _WINDOW_OPTION_LENGTH)
        _put_u32(out + 4, <unsigned long>value)
        _put_u32(out + 8, <unsigned long>size)
    elif code == _OPT_IDEMPOTENCE_EXPENDITURE:
        value = _check_int(_field(option, L, 0, "token", exact), _U32_MAX, "idempotence token")
        _push_u32_option(w, _KIND_IDEMPOTENCE_EXPENDITURE, <unsigned long>value)
    elif code == _OPT_UNKNOWN:
        _encode_unknown(w, option, L, exact)
    elif code == _OPT_SESSION_REQUEST:
        _push_empty_option(w, _KIND_SESSION_REQUEST)
    elif code == _OPT_SESSION_OK:
        _push_empty_option(w, _KIND_SESSION_OK)
    elif code == _OPT_SESSION_INVALID:
        _push_empty_option(w, _KIND_SESSION_INVALID)
    elif code == _OPT_SESSION_TEARDOWN:
        _push_empty_option(w, _KIND_SESSION_TEARDOWN)
    elif code == _OPT_IDEMPOTENCE_ACCEPTED:
        _push_empty_option(w, _KIND_IDEMPOTENCE_ACCEPTED)
    else:  # _OPT_IDEMPOTENCE_REJECTED
        _push_empty_option(w, _KIND_IDEMPOTENCE_REJECTED)
    return 0


cdef int _push_empty_option(_Out* w, unsigned int kind) except -1:
    cdef unsigned char* out = _out_take(w, _EMPTY_OPTION_LENGTH)
    _put_u16(out, kind)
    _put_u16(out + 2, _EMPTY_OPTION_LENGTH)
    return 0


cdef int _push_u32_option(_Out* w, unsigned int kind, unsigned long value) except -1:
    cdef unsigned char* out = _out_take(w, _U32_OPTION_LENGTH)
    _put_u16(out, kind)
    _put_u16(out + 2, _U32_OPTION_LENGTH)
    _put_u32(out + 4, value)
    return 0


cdef int _encode_unknown_stack(_Out* w, object option, _Layout L, bint exact) except -1:
    cdef long long leg = _check_int(_field(option, L, 0, "leg", exact), _STACK_LEG_MAX, "stack leg")
    cdef long long level = _check_int(_field(option, L, 1, "level", exact), _STACK_LEVEL_MASK, "stack level")
    cdef long long code = _check_int(_field(option, L, 2, "code", exact), 0xFF, "stack code")
    cdef unsigned int key = <unsigned int>((level << 8) | code)
    cdef const unsigned char* raw
    data = _field(option, L, 3, "data", exact)
    if not _is_buffer(data):
        raise LocalProtocolError("stack option data is not bytes")
    # bytes() copies every byte of a memoryview (nbytes), not len() items.
    if type(data) is not bytes:
        data = bytes(data)
    # It must decode back as unknown, or the round trip would change its type:
    # a known (Leg, Level, Code) is unknown only with a length or value
    # draft-11 does not define.
    # Cast: bytes' char* data, read only when it holds 2 bytes.
    raw = <const unsigned char*>PyBytes_AS_STRING(data)
    if leg != 0 and _known_stack_key(key) and PyBytes_GET_SIZE(data) == 2 \
            and _stack_value_defined(key, raw[0], raw[1]):
        raise LocalProtocolError("unknown stack option uses a known level and code")
    # Leg/Level and Code take 2 bytes; the data (padding included) ends the option.
    if (2 + PyBytes_GET_SIZE(data)) & 3:
        raise LocalProtocolError("stack option data length is not 2 modulo 4")
    body = bytes(((leg << _STACK_LEG_SHIFT) | level, code)) + data
    _push_option(w, _KIND_STACK, body, 0)
    return 0


cdef int _encode_advertisement(_Out* w, object option, _Layout L, bint exact) except -1:
    cdef long long initial = _check_int(
        _field(option, L, 0, "initial_data_length", exact), _MAX_INITIAL_DATA_LENGTH, "initial data length"
    )
    cdef long long method
    cdef Py_ssize_t n
    body = bytearray((initial >> 8, initial & 0xFF))
    for item in _field(option, L, 1, "methods", exact):
        method = _check_int(item, 0xFF, "authentication method")
        # AUTH-08: clients do not advertise "no authentication"; it would also
        # be indistinguishable from the zero padding.
        if method == 0:
            raise LocalProtocolError("authentication method 0 is never advertised")
        body.append(method)
    body = bytes(body)
    # Padding: "a minimally-sized sequence of zeroes".
    n = PyBytes_GET_SIZE(body)
    _push_option(w, _KIND_ADVERTISEMENT, body, _pad4(n) - n)
    return 0


cdef int _encode_unknown(_Out* w, object option, _Layout L, bint exact) except -1:
    cdef long long kind = _check_int(_field(option, L, 0, "kind", exact), 0xFFFF, "option kind")
    # It must decode back as unknown, or the round trip would change its type.
    if _known_kind(<unsigned long>kind):
        raise LocalProtocolError("unknown option uses a known kind")
    data = _field(option, L, 1, "data", exact)
    if not _is_buffer(data):
        raise LocalProtocolError("option data is not bytes")
    # bytes() copies every byte of a memoryview (nbytes), not len() items.
    if type(data) is not bytes:
        data = bytes(data)
    if PyBytes_GET_SIZE(data) & 3:
        raise LocalProtocolError("option data length is not a multiple of 4")
    _push_option(w, <unsigned int>kind, data, 0)
    return 0


cdef int _encode_options_into(_Out* w, object options) except -1:
    for option in options:
        _encode_option(w, option)
    return 0


def encode_options(options):
    """Encode options in order.

    Twin of ``socks6fast.proto._codec_py.encode_options``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef _Out w
    _out_init(&w)
    try:
        _encode_options_into(&w, options)
        return _bytes(w.data, w.length)
    finally:
        _out_free(&w)


cdef int _encode_message_options(_Out* w, object options) except -1:
    if not isinstance(options, (tuple, list)):
        raise LocalProtocolError("options is not a tuple or list")
    _encode_options_into(w, options)
    # D6 / REQ-03: we never send more than 16 KB of options.
    if w.length > _MAX_OPTIONS_LENGTH:
        raise LocalProtocolError("options length exceeds 16384")
    return 0


cdef int _parse_ipv4(object address, unsigned char* out) except -1:
    """1 and the 4 bytes in out if address is what ipaddress.IPv4Address accepts, else 0.

    Its rules: four "."-separated octets of 1-3 ASCII digits, no leading zero
    (except "0" itself), each at most 255.
    """
    cdef const unsigned char* s
    cdef Py_ssize_t n, i, digits = 0
    cdef int octet = 0, count = 0
    if not PyUnicode_IS_ASCII(address):
        return 0
    s = PyUnicode_1BYTE_DATA(address)
    n = PyUnicode_GET_LENGTH(address)
    for i in range(n + 1):
        if i == n or s[i] == b".":
            if digits == 0 or count == 4:
                return 0
            out[count] = <unsigned char>octet
            count += 1
            digits = 0
            octet = 0
        elif b"0" <= s[i] <= b"9":
            if digits == 3 or (digits == 1 and octet == 0):  # too long, or a leading zero
                return 0
            octet = octet * 10 + (s[i] - 48)
            if octet > 255:
                return 0
            digits += 1
        else:
            return 0
    return count == 4


cdef int _encode_ip(object address_type, object address, unsigned char* out) except -1:
    """Write the 4 or 16 bytes of an IP address (reference _encode_ip); returns the length."""
    if not isinstance(address, str):
        raise LocalProtocolError("address is not a string")
    if address_type == _IPV4_MEMBER:
        if _parse_ipv4(address, out):
            return _IPV4_LENGTH
        raise LocalProtocolError("address is not a valid ip address")
    # IPv6 text has many spellings: let ipaddress parse it, as the reference does.
    # A scope ("fe80::1%eth0") has no place on the wire.
    if "%" not in address:
        try:
            packed = ipaddress.IPv6Address(address).packed
        except ValueError:
            pass
        else:
            # Cast: bytes' char* data; IPv6Address.packed is always 16 bytes.
            memcpy(out, <const unsigned char*>PyBytes_AS_STRING(packed), _IPV6_LENGTH)
            return _IPV6_LENGTH
    raise LocalProtocolError("address is not a valid ip address")


cdef const unsigned char* _encode_name(object address, Py_ssize_t* length) except NULL:
    """The UTF-8 bytes of a domain name (D2 checks); borrowed from the str's UTF-8 cache."""
    cdef const char* raw
    if not isinstance(address, str):
        raise LocalProtocolError("address is not a string")
    try:
        raw = PyUnicode_AsUTF8AndSize(address, length)
    except UnicodeEncodeError:
        raise LocalProtocolError("domain name is not valid unicode") from None
    if length[0] == 0:
        raise LocalProtocolError("domain name is empty")
    if length[0] > _MAX_DOMAIN_LENGTH:
        raise LocalProtocolError("domain name is longer than 255 bytes")
    if memchr(raw, 0, length[0]) != NULL:
        raise LocalProtocolError("domain name contains a nul byte")
    # Cast: UTF-8 text as unsigned bytes.
    return <const unsigned char*>raw


cdef Py_ssize_t _encode_address(int atyp, object address, unsigned char* out) except -1:
    """Write an address field (IPv4, IPv6 or a D2-padded name) into out (>= 260 bytes).

    atyp was checked to be 1, 3 or 4. Returns the field length.
    """
    cdef Py_ssize_t n = 0, field
    cdef const unsigned char* name
    if atyp == _ATYP_DOMAIN:
        name = _encode_name(address, &n)
        # D2: length byte without padding, the name, NULs to a 4-byte boundary.
        field = _pad4(1 + n)
        out[0] = <unsigned char>n
        memcpy(out + 1, name, n)
        memset(out + 1 + n, 0, field - 1 - n)
        return field
    return _encode_ip(_IPV4_MEMBER if atyp == _ATYP_IPV4 else _IPV6_MEMBER, address, out)


cdef inline bint _all_zero(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] != 0:
            return False
    return True


cdef bytes _encode_addressed(unsigned int code, object address_type, object address, object port, object options,
                             bint noop=False):
    # Checked in this order: address type, address, port, options (tests/codec_api.py).
    cdef int atyp = _table_value(address_type, _ADDRESS_TYPES)
    cdef unsigned char field[_MAX_DOMAIN_LENGTH + 5]
    cdef Py_ssize_t field_length
    cdef long long port_value
    cdef unsigned char* out
    cdef _Out w
    if atyp < 0:
        raise LocalProtocolError("address type is not supported")
    # Section "Requests", NOOP: "The Address Type field MUST be either 0x01
    # (IPv4) or 0x04 (IPv6). The Address and Port fields MUST be 0."
    if noop and atyp == _ATYP_DOMAIN:
        raise LocalProtocolError("noop address type is not ipv4 or ipv6")
    field_length = _encode_address(atyp, address, field)
    port_value = _check_int(port, 0xFFFF, "port")
    if noop and (port_value != 0 or not _all_zero(field, field_length)):
        raise LocalProtocolError("noop address or port is not zero")
    _out_init(&w)
    try:
        _encode_message_options(&w, options)
        result = PyBytes_FromStringAndSize(NULL, _ADDRESSED_HEADER_LENGTH + field_length + w.length)
        # Cast: a fresh bytes object is writable until it is shared.
        out = <unsigned char*>PyBytes_AS_STRING(result)
        out[0] = _VERSION
        out[1] = <unsigned char>code
        _put_u16(out + 2, <unsigned int>w.length)
        _put_u16(out + 4, <unsigned int>port_value)
        out[6] = 0
        out[7] = <unsigned char>atyp
        memcpy(out + _ADDRESSED_HEADER_LENGTH, field, field_length)
        memcpy(out + _ADDRESSED_HEADER_LENGTH + field_length, w.data, w.length)
        return result
    finally:
        _out_free(&w)


def encode_request(request):
    """Encode a Request (figure "SOCKS 6 Request").

    Twin of ``socks6fast.proto._codec_py.encode_request``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef int code = _table_value(request.command, _COMMANDS)
    if code < 0:
        raise LocalProtocolError("command is not supported")
    return _encode_addressed(code, request.address_type, request.address, request.port, request.options,
                             code == _CMD_NOOP)


def encode_operation_reply(reply):
    """Encode an Operation Reply (figure "SOCKS 6 Operation Reply").

    Twin of ``socks6fast.proto._codec_py.encode_operation_reply``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef int code = _table_value(reply.reply_code, _REPLY_CODES)
    if code < 0:
        raise LocalProtocolError("reply code is unknown")
    return _encode_addressed(code, reply.address_type, reply.address, reply.port, reply.options)


def encode_auth_reply(reply):
    """Encode an Authentication Reply (figure "SOCKS 6 Authentication Reply").

    Twin of ``socks6fast.proto._codec_py.encode_auth_reply``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef _Out w
    cdef int code = _table_value(reply.type, _AUTH_REPLY_TYPES)
    cdef unsigned char* out
    if code < 0:
        raise LocalProtocolError("authentication reply type is unknown")
    _out_init(&w)
    try:
        _encode_message_options(&w, reply.options)
        result = PyBytes_FromStringAndSize(NULL, _AUTH_REPLY_HEADER_LENGTH + w.length)
        # Cast: a fresh bytes object is writable until it is shared.
        out = <unsigned char*>PyBytes_AS_STRING(result)
        out[0] = _VERSION
        out[1] = <unsigned char>code
        _put_u16(out + 2, <unsigned int>w.length)
        memcpy(out + _AUTH_REPLY_HEADER_LENGTH, w.data, w.length)
        return result
    finally:
        _out_free(&w)


def encode_version_mismatch():
    """The Version Mismatch Reply: the single byte 6 (section "Version Mismatch Replies").

    Twin of ``socks6fast.proto._codec_py.encode_version_mismatch``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    return _VERSION_MISMATCH


# --- Datagram Header --------------------------------------------------------------


cdef Py_ssize_t write_datagram_header(
    unsigned char* out,
    Py_ssize_t capacity,
    const unsigned char* association_id,
    unsigned int address_type,
    const unsigned char* address,
    Py_ssize_t address_length,
    unsigned int port,
    unsigned int message_length,
) noexcept nogil:
    """Write a Datagram Header at out; the header length, -1 if capacity is too small,
    -2 for a field the draft forbids (address_length must match the type; a name
    is 1-255 bytes without NUL, sent with D2 padding; message_length >= header).
    """
    cdef Py_ssize_t field, header_length
    if address_type == _ATYP_IPV4:
        if address_length != _IPV4_LENGTH:
            return -2
        field = _IPV4_LENGTH
    elif address_type == _ATYP_IPV6:
        if address_length != _IPV6_LENGTH:
            return -2
        field = _IPV6_LENGTH
    elif address_type == _ATYP_DOMAIN:
        if address_length < 1 or address_length > _MAX_DOMAIN_LENGTH:
            return -2
        if memchr(address, 0, address_length) != NULL:
            return -2
        field = _pad4(1 + address_length)
    else:
        return -2
    header_length = DGRAM_ADDRESS_OFFSET + field
    if port > 0xFFFF or message_length > 0xFFFF or message_length < header_length:
        return -2
    if capacity < header_length:
        return -1
    out[0] = _VERSION
    out[1] = _MSG_DATAGRAM
    _put_u16(out + 2, message_length)
    memcpy(out + _ASSOC_PREFIX_LENGTH, association_id, _ASSOCIATION_ID_LENGTH)
    # D5: Address Type, Padding, Port (not the Request's Port, Padding, ATYP).
    out[_ASSOC_HEADER_LENGTH] = <unsigned char>address_type
    out[_ASSOC_HEADER_LENGTH + 1] = 0
    _put_u16(out + _ASSOC_HEADER_LENGTH + 2, port)
    if address_type == _ATYP_DOMAIN:
        out[DGRAM_ADDRESS_OFFSET] = <unsigned char>address_length
        memcpy(out + DGRAM_ADDRESS_OFFSET + 1, address, address_length)
        memset(out + DGRAM_ADDRESS_OFFSET + 1 + address_length, 0, field - 1 - address_length)
    else:
        memcpy(out + DGRAM_ADDRESS_OFFSET, address, address_length)
    return header_length


cdef const unsigned char* _check_association_id(object association_id, unsigned char* copy) except NULL:
    """The 8 bytes of an Association ID (reference _check_association_id).

    Points into association_id (the caller keeps it alive) or into copy. Counted
    in bytes, not items, as the reference does.
    """
    if type(association_id) is bytes:
        if PyBytes_GET_SIZE(association_id) == _ASSOCIATION_ID_LENGTH:
            # Cast: bytes' char* data, borrowed while association_id is alive.
            return <const unsigned char*>PyBytes_AS_STRING(association_id)
    elif _is_buffer(association_id):
        raw = bytes(association_id)
        if PyBytes_GET_SIZE(raw) == _ASSOCIATION_ID_LENGTH:
            # Cast: bytes' char* data, 8 bytes as just checked.
            memcpy(copy, <const unsigned char*>PyBytes_AS_STRING(raw), _ASSOCIATION_ID_LENGTH)
            return copy
    raise LocalProtocolError("association id is not 8 bytes")


cdef Py_ssize_t _encode_datagram_header(object header, unsigned char* out) except -1:
    """Validate header like the reference and write it to out (DGRAM_HEADER_MAX_LENGTH bytes)."""
    cdef bint exact = type(header) is DatagramHeader
    cdef unsigned char association_id[_ASSOCIATION_ID_LENGTH]
    cdef unsigned char field[_MAX_DOMAIN_LENGTH + 5]
    # Held in a local: aid may point into it (a property could return a fresh object).
    aid_object = _field(header, _L_DATAGRAM_HEADER, 0, "association_id", exact)
    cdef const unsigned char* aid = _check_association_id(aid_object, association_id)
    cdef int atyp = _table_value(_field(header, _L_DATAGRAM_HEADER, 1, "address_type", exact), _ADDRESS_TYPES)
    cdef Py_ssize_t field_length, header_length
    cdef long long port, message_length
    if atyp < 0:
        raise LocalProtocolError("address type is not supported")
    field_length = _encode_address(atyp, _field(header, _L_DATAGRAM_HEADER, 2, "address", exact), field)
    port = _check_int(_field(header, _L_DATAGRAM_HEADER, 3, "port", exact), 0xFFFF, "port")
    header_length = DGRAM_ADDRESS_OFFSET + field_length
    message_length = _check_int(
        _field(header, _L_DATAGRAM_HEADER, 4, "message_length", exact), 0xFFFF, "message length"
    )
    if message_length < header_length:
        raise LocalProtocolError("message length is less than the header length")
    out[0] = _VERSION
    out[1] = _MSG_DATAGRAM
    _put_u16(out + 2, <unsigned int>message_length)
    memcpy(out + _ASSOC_PREFIX_LENGTH, aid, _ASSOCIATION_ID_LENGTH)
    # D5: Address Type, Padding, Port (not the Request's Port, Padding, ATYP).
    out[_ASSOC_HEADER_LENGTH] = <unsigned char>atyp
    out[_ASSOC_HEADER_LENGTH + 1] = 0
    _put_u16(out + _ASSOC_HEADER_LENGTH + 2, <unsigned int>port)
    memcpy(out + DGRAM_ADDRESS_OFFSET, field, field_length)
    return header_length


cdef int _acquire_writable(object out, Py_buffer* view) except -1:
    # PyBUF_WRITABLE: the contiguous bytes of a writable exporter (nbytes,
    # whatever its item size), like the reference's memoryview checks; a
    # non-buffer, read-only or non-contiguous out is refused the same way.
    if s6_get_buffer(out, view, PyBUF_WRITABLE) == 0:
        return 0
    if PyErr_ExceptionMatches(BufferError) or PyErr_ExceptionMatches(TypeError):
        PyErr_Clear()
        raise LocalProtocolError("output buffer is not writable")
    return -1  # any other error of PyObject_GetBuffer propagates


def encode_datagram_header(header, out, offset=0):
    """Write a Datagram Header into a preallocated buffer.

    Twin of ``socks6fast.proto._codec_py.encode_datagram_header``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef unsigned char encoded[DGRAM_HEADER_MAX_LENGTH]
    cdef Py_ssize_t n = _encode_datagram_header(header, encoded)
    cdef Py_ssize_t start
    cdef Py_buffer view
    _acquire_writable(out, &view)
    try:
        start = PyNumber_AsSsize_t(offset, NULL)  # clamped: a huge offset is too large anyway
        if start < 0 or view.len - start < n:
            raise LocalProtocolError("output buffer is too small")
        # Cast: the writable buffer's bytes; start + n <= view.len checked above.
        memcpy(<unsigned char*>view.buf + start, encoded, n)
        return n
    finally:
        PyBuffer_Release(&view)


cdef Py_ssize_t _address_field_length(object address_type, object address) except -1:
    # The same table lookup as every encoder (an int, not bool or 1.0).
    cdef Py_ssize_t n = 0
    cdef int atyp = _table_value(address_type, _ADDRESS_TYPES)
    if atyp == _ATYP_IPV4:
        return _IPV4_LENGTH
    if atyp == _ATYP_IPV6:
        return _IPV6_LENGTH
    if atyp == _ATYP_DOMAIN:
        if not isinstance(address, str):
            raise LocalProtocolError("address is not a string")
        try:
            PyUnicode_AsUTF8AndSize(address, &n)
        except UnicodeEncodeError:
            raise LocalProtocolError("domain name is not valid unicode") from None
        if n == 0:
            raise LocalProtocolError("domain name is empty")
        if n > _MAX_DOMAIN_LENGTH:
            raise LocalProtocolError("domain name is longer than 255 bytes")
        return _pad4(1 + n)
    raise LocalProtocolError("address type is not supported")


def datagram_header_length(address_type, address):
    """Length of the Datagram Header for this address, to compute Message Length.

    Twin of ``socks6fast.proto._codec_py.datagram_header_length``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    return DGRAM_ADDRESS_OFFSET + _address_field_length(address_type, address)


# --- Association messages ---------------------------------------------------------


cdef bytes _encode_datagram_error(object message):
    cdef unsigned char association_id[_ASSOCIATION_ID_LENGTH]
    cdef unsigned char address[_IPV6_LENGTH]
    cdef unsigned char reporter[_IPV6_LENGTH]
    # Held in a local: aid may point into it.
    aid_object = message.association_id
    cdef const unsigned char* aid = _check_association_id(aid_object, association_id)
    cdef Py_ssize_t address_length, reporter_length, total
    cdef long long port
    cdef int error_code
    cdef unsigned char* out
    cdef int atyp = _table_value(message.address_type, _ADDRESS_TYPES)
    cdef int reporter_atyp
    # Section "Reporting ICMP Errors": both address types "Either 0x01 (IPv4) or 0x04 (IPv6)".
    if atyp != _ATYP_IPV4 and atyp != _ATYP_IPV6:
        raise LocalProtocolError("datagram error address type is not ipv4 or ipv6")
    reporter_atyp = _table_value(message.reporter_address_type, _ADDRESS_TYPES)
    if reporter_atyp != _ATYP_IPV4 and reporter_atyp != _ATYP_IPV6:
        raise LocalProtocolError("datagram error address type is not ipv4 or ipv6")
    address_length = _encode_ip(_IPV4_MEMBER if atyp == _ATYP_IPV4 else _IPV6_MEMBER, message.address, address)
    reporter_length = _encode_ip(_IPV4_MEMBER if reporter_atyp == _ATYP_IPV4 else _IPV6_MEMBER,
                                 message.reporter_address, reporter)
    port = _check_int(message.port, 0xFFFF, "port")
    error_code = _table_value(message.error_code, _DGRAM_ERROR_CODES)
    if error_code < 0:
        raise LocalProtocolError("datagram error code is unknown")
    # "0x04: Datagram too big (IPv6 only)".
    if error_code == _DGRAM_TOO_BIG and (atyp != _ATYP_IPV6 or reporter_atyp != _ATYP_IPV6):
        raise LocalProtocolError("datagram too big is for ipv6 only")
    total = DGRAM_ADDRESS_OFFSET + address_length + _REPORTER_PREFIX_LENGTH + reporter_length
    result = PyBytes_FromStringAndSize(NULL, total)
    # Cast: a fresh bytes object is writable until it is shared.
    out = <unsigned char*>PyBytes_AS_STRING(result)
    out[0] = _VERSION
    out[1] = _MSG_ERROR
    _put_u16(out + 2, <unsigned int>total)
    memcpy(out + _ASSOC_PREFIX_LENGTH, aid, _ASSOCIATION_ID_LENGTH)
    out[_ASSOC_HEADER_LENGTH] = _ATYP_IPV4 if address_length == _IPV4_LENGTH else _ATYP_IPV6
    out[_ASSOC_HEADER_LENGTH + 1] = 0
    _put_u16(out + _ASSOC_HEADER_LENGTH + 2, <unsigned int>port)
    memcpy(out + DGRAM_ADDRESS_OFFSET, address, address_length)
    out = out + DGRAM_ADDRESS_OFFSET + address_length
    out[0] = _ATYP_IPV4 if reporter_length == _IPV4_LENGTH else _ATYP_IPV6
    out[1] = <unsigned char>error_code
    out[2] = 0
    out[3] = 0
    memcpy(out + _REPORTER_PREFIX_LENGTH, reporter, reporter_length)
    return result


def encode_association_message(message):
    """Encode a UDP association message for the TCP stream.

    Twin of ``socks6fast.proto._codec_py.encode_association_message``, which documents it (arguments,
    results, errors); the two agree byte for byte and error for error.
    """
    cdef unsigned char association_id[_ASSOCIATION_ID_LENGTH]
    cdef unsigned char encoded[DGRAM_HEADER_MAX_LENGTH]
    cdef const unsigned char* aid
    cdef unsigned char* out
    cdef Py_ssize_t n
    cls = type(message)
    if cls is AssociationInit or cls is AssociationConfirmation:
        # Held in a local: aid may point into it.
        aid_object = message.association_id
        aid = _check_association_id(aid_object, association_id)
        result = PyBytes_FromStringAndSize(NULL, _ASSOCIATION_MESSAGE_LENGTH)
        # Cast: a fresh bytes object is writable until it is shared.
        out = <unsigned char*>PyBytes_AS_STRING(result)
        out[0] = _VERSION
        out[1] = _MSG_INIT if cls is AssociationInit else _MSG_CONFIRMATION
        _put_u16(out + 2, _ASSOCIATION_MESSAGE_LENGTH)
        memcpy(out + _ASSOC_PREFIX_LENGTH, aid, _ASSOCIATION_ID_LENGTH)
        return result
    if cls is Datagram:
        # Its header, then the payload type, then length == header + payload.
        header = message.header
        if not isinstance(header, DatagramHeader):
            raise LocalProtocolError("datagram header has the wrong type")
        n = _encode_datagram_header(header, encoded)
        payload = message.payload
        if not _is_buffer(payload):
            raise LocalProtocolError("datagram payload is not bytes")
        # bytes() copies every byte of a memoryview (nbytes), not len() items.
        if type(payload) is not bytes:
            payload = bytes(payload)
        if message.header.message_length != n + PyBytes_GET_SIZE(payload):
            raise LocalProtocolError("message length does not match header and payload")
        return _bytes(encoded, n) + payload
    if cls is DatagramError:
        return _encode_datagram_error(message)
    raise LocalProtocolError("not a udp association message")
