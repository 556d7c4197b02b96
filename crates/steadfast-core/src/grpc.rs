//! gRPC status codes, per the gRPC specification (`doc/statuscodes.md`).

use std::fmt;

use http::{HeaderMap, HeaderName, HeaderValue};

/// The `grpc-status` header / trailer name.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// The `grpc-message` header / trailer name.
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// A gRPC status code.
///
/// Numbers and names follow the gRPC specification. A `grpc-status` value that is not a known
/// code parses as [`GrpcCode::Unknown`], as the specification asks of clients.
///
/// ```
/// use steadfast_core::GrpcCode;
///
/// assert_eq!(GrpcCode::from_i32(14), GrpcCode::Unavailable);
/// assert_eq!(GrpcCode::Unavailable.as_str(), "UNAVAILABLE");
/// assert_eq!(GrpcCode::from_header(&http::HeaderValue::from_static("4")), GrpcCode::DeadlineExceeded);
/// assert_eq!(GrpcCode::from_header(&http::HeaderValue::from_static("x")), GrpcCode::Unknown);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum GrpcCode {
    /// `0`: not an error.
    Ok = 0,
    /// `1`: the operation was cancelled, typically by the caller.
    Cancelled = 1,
    /// `2`: unknown error.
    Unknown = 2,
    /// `3`: the client specified an invalid argument.
    InvalidArgument = 3,
    /// `4`: the deadline expired before the operation could complete.
    DeadlineExceeded = 4,
    /// `5`: some requested entity was not found.
    NotFound = 5,
    /// `6`: the entity a client attempted to create already exists.
    AlreadyExists = 6,
    /// `7`: the caller does not have permission.
    PermissionDenied = 7,
    /// `8`: some resource has been exhausted.
    ResourceExhausted = 8,
    /// `9`: the system is not in a state required for the operation.
    FailedPrecondition = 9,
    /// `10`: the operation was aborted.
    Aborted = 10,
    /// `11`: the operation was attempted past the valid range.
    OutOfRange = 11,
    /// `12`: the operation is not implemented or supported.
    Unimplemented = 12,
    /// `13`: internal error.
    Internal = 13,
    /// `14`: the service is currently unavailable; retrying may help.
    Unavailable = 14,
    /// `15`: unrecoverable data loss or corruption.
    DataLoss = 15,
    /// `16`: the request lacks valid authentication credentials.
    Unauthenticated = 16,
}

const ALL: [GrpcCode; 17] = [
    GrpcCode::Ok,
    GrpcCode::Cancelled,
    GrpcCode::Unknown,
    GrpcCode::InvalidArgument,
    GrpcCode::DeadlineExceeded,
    GrpcCode::NotFound,
    GrpcCode::AlreadyExists,
    GrpcCode::PermissionDenied,
    GrpcCode::ResourceExhausted,
    GrpcCode::FailedPrecondition,
    GrpcCode::Aborted,
    GrpcCode::OutOfRange,
    GrpcCode::Unimplemented,
    GrpcCode::Internal,
    GrpcCode::Unavailable,
    GrpcCode::DataLoss,
    GrpcCode::Unauthenticated,
];

impl GrpcCode {
    /// The code for a number; numbers outside `0..=16` are [`GrpcCode::Unknown`].
    pub const fn from_i32(n: i32) -> Self {
        if n >= 0 && n <= 16 {
            ALL[n as usize]
        } else {
            GrpcCode::Unknown
        }
    }

    /// Parses a `grpc-status` value: one or two ASCII digits. Anything else is
    /// [`GrpcCode::Unknown`].
    pub fn from_header(value: &HeaderValue) -> Self {
        Self::from_bytes(value.as_bytes())
    }

    /// Parses a `grpc-status` value from raw bytes; see [`GrpcCode::from_header`].
    pub const fn from_bytes(bytes: &[u8]) -> Self {
        match bytes {
            [d] if d.is_ascii_digit() => Self::from_i32((*d - b'0') as i32),
            [a, b] if a.is_ascii_digit() && b.is_ascii_digit() && *a != b'0' => {
                Self::from_i32(((*a - b'0') * 10 + (*b - b'0')) as i32)
            }
            _ => GrpcCode::Unknown,
        }
    }

    /// Reads `grpc-status` from a header or trailer map, if present.
    pub fn from_map(map: &HeaderMap) -> Option<Self> {
        if map.is_empty() {
            return None;
        }
        map.get(&GRPC_STATUS).map(Self::from_header)
    }

    /// The code's number.
    pub const fn as_i32(self) -> i32 {
        self as i32
    }

    /// The canonical upper-case name, e.g. `"UNAVAILABLE"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            GrpcCode::Ok => "OK",
            GrpcCode::Cancelled => "CANCELLED",
            GrpcCode::Unknown => "UNKNOWN",
            GrpcCode::InvalidArgument => "INVALID_ARGUMENT",
            GrpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            GrpcCode::NotFound => "NOT_FOUND",
            GrpcCode::AlreadyExists => "ALREADY_EXISTS",
            GrpcCode::PermissionDenied => "PERMISSION_DENIED",
            GrpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            GrpcCode::FailedPrecondition => "FAILED_PRECONDITION",
            GrpcCode::Aborted => "ABORTED",
            GrpcCode::OutOfRange => "OUT_OF_RANGE",
            GrpcCode::Unimplemented => "UNIMPLEMENTED",
            GrpcCode::Internal => "INTERNAL",
            GrpcCode::Unavailable => "UNAVAILABLE",
            GrpcCode::DataLoss => "DATA_LOSS",
            GrpcCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// The `grpc-status` header value for this code (no allocation).
    pub const fn to_header_value(self) -> HeaderValue {
        const VALUES: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        HeaderValue::from_static(VALUES[self as usize])
    }

    /// The gRPC code a client reports for a non-gRPC HTTP response status, per the gRPC
    /// specification's `http-grpc-status-mapping.md`.
    pub const fn from_http_status(status: u16) -> Self {
        match status {
            400 => GrpcCode::Internal,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::Unimplemented,
            429 | 502 | 503 | 504 => GrpcCode::Unavailable,
            _ => GrpcCode::Unknown,
        }
    }
}

/// A name or number that is not a gRPC status code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownGrpcCode(String);

impl fmt::Display for UnknownGrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a gRPC status code (a canonical name such as UNAVAILABLE, or 0-16)",
            self.0
        )
    }
}

impl std::error::Error for UnknownGrpcCode {}

/// Parses a canonical name (`"UNAVAILABLE"`; case-insensitive, as gRPC's service configs
/// write them either way) or a number (`"14"`). Unlike [`GrpcCode::from_header`], which
/// reads what a server sent and maps anything unknown to `UNKNOWN` as the specification asks,
/// this is for configuration: an unknown name is an error.
///
/// ```
/// use steadfast_core::GrpcCode;
///
/// assert_eq!("UNAVAILABLE".parse::<GrpcCode>(), Ok(GrpcCode::Unavailable));
/// assert_eq!("deadline_exceeded".parse::<GrpcCode>(), Ok(GrpcCode::DeadlineExceeded));
/// assert_eq!("14".parse::<GrpcCode>(), Ok(GrpcCode::Unavailable));
/// assert!("UNAVAILABLY".parse::<GrpcCode>().is_err());
/// assert!("17".parse::<GrpcCode>().is_err());
/// ```
impl std::str::FromStr for GrpcCode {
    type Err = UnknownGrpcCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        if let Ok(n) = trimmed.parse::<i32>() {
            return GrpcCode::try_from(n).map_err(|_| UnknownGrpcCode(s.to_owned()));
        }
        ALL.into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(trimmed))
            .ok_or_else(|| UnknownGrpcCode(s.to_owned()))
    }
}

/// The code with this number; numbers outside 0-16 are an error (not `UNKNOWN`).
///
/// ```
/// use steadfast_core::GrpcCode;
///
/// assert_eq!(GrpcCode::try_from(4), Ok(GrpcCode::DeadlineExceeded));
/// assert!(GrpcCode::try_from(-1).is_err());
/// ```
impl TryFrom<i32> for GrpcCode {
    type Error = UnknownGrpcCode;

    fn try_from(n: i32) -> Result<Self, Self::Error> {
        usize::try_from(n)
            .ok()
            .and_then(|i| ALL.get(i).copied())
            .ok_or_else(|| UnknownGrpcCode(n.to_string()))
    }
}

impl From<GrpcCode> for i32 {
    fn from(code: GrpcCode) -> i32 {
        code.as_i32()
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`GrpcCode`]s, as a bit mask.
///
/// ```
/// use steadfast_core::{GrpcCode, GrpcCodeSet};
///
/// let set = GrpcCodeSet::EMPTY.with(GrpcCode::Unavailable);
/// assert!(set.contains(GrpcCode::Unavailable));
/// assert!(!set.contains(GrpcCode::Internal));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct GrpcCodeSet(u32);

impl GrpcCodeSet {
    /// No codes.
    pub const EMPTY: Self = Self(0);

    /// The set with `code` added.
    #[must_use]
    pub const fn with(self, code: GrpcCode) -> Self {
        Self(self.0 | 1 << code as u32)
    }

    /// The set with `code` removed.
    #[must_use]
    pub const fn without(self, code: GrpcCode) -> Self {
        Self(self.0 & !(1 << code as u32))
    }

    /// A set holding exactly `codes`.
    pub const fn of(codes: &[GrpcCode]) -> Self {
        let mut set = Self::EMPTY;
        let mut i = 0;
        while i < codes.len() {
            set = set.with(codes[i]);
            i += 1;
        }
        set
    }

    /// Whether `code` is in the set.
    pub const fn contains(self, code: GrpcCode) -> bool {
        self.0 & (1 << code as u32) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_round_trip() {
        for (n, code) in ALL.iter().enumerate() {
            assert_eq!(GrpcCode::from_i32(n as i32), *code);
            assert_eq!(code.as_i32(), n as i32);
            let v = code.to_header_value();
            assert_eq!(GrpcCode::from_header(&v), *code);
            assert_eq!(v.to_str().unwrap(), n.to_string());
            assert_eq!(code.as_str().parse::<GrpcCode>(), Ok(*code));
            assert_eq!(code.as_str().to_lowercase().parse::<GrpcCode>(), Ok(*code));
            assert_eq!(n.to_string().parse::<GrpcCode>(), Ok(*code));
            assert_eq!(GrpcCode::try_from(n as i32), Ok(*code));
            assert_eq!(i32::from(*code), n as i32);
        }
        for bad in ["", "17", "-1", "OKAY", "UNAVAILABLE_", "2147483648"] {
            assert!(bad.parse::<GrpcCode>().is_err(), "{bad}");
        }
        assert!(GrpcCode::try_from(17).is_err());
        assert!(GrpcCode::try_from(i32::MIN).is_err());
        assert_eq!(GrpcCode::DataLoss.to_string(), "DATA_LOSS");
    }

    #[test]
    fn hostile_status_values_are_unknown() {
        for raw in [
            &b""[..],
            b"-1",
            b"17",
            b"99",
            b"014",
            b"01",
            b" 4",
            b"4 ",
            b"+4",
            b"\xff",
            b"1000000000000",
        ] {
            assert_eq!(GrpcCode::from_bytes(raw), GrpcCode::Unknown, "{raw:?}");
        }
        assert_eq!(GrpcCode::from_i32(i32::MIN), GrpcCode::Unknown);
        assert_eq!(GrpcCode::from_i32(i32::MAX), GrpcCode::Unknown);
    }

    #[test]
    fn http_status_mapping() {
        assert_eq!(GrpcCode::from_http_status(503), GrpcCode::Unavailable);
        assert_eq!(GrpcCode::from_http_status(404), GrpcCode::Unimplemented);
        assert_eq!(GrpcCode::from_http_status(500), GrpcCode::Unknown);
    }
}
