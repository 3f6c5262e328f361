//! The switch's internal words: what a terminal asked for, the state of a
//! journal entry, the answer. Only the edges know field numbers.

use std::fmt;

/// A two-character response code (F39).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResponseCode([u8; 2]);

impl ResponseCode {
    /// `00` approved.
    pub const APPROVED: ResponseCode = ResponseCode(*b"00");
    /// `03` invalid merchant.
    pub const INVALID_MERCHANT: ResponseCode = ResponseCode(*b"03");
    /// `12` invalid transaction.
    pub const INVALID_TRANSACTION: ResponseCode = ResponseCode(*b"12");
    /// `14` invalid card number.
    pub const INVALID_CARD: ResponseCode = ResponseCode(*b"14");
    /// `15` no such issuer.
    pub const NO_SUCH_ISSUER: ResponseCode = ResponseCode(*b"15");
    /// `25` original not found.
    pub const NOT_FOUND: ResponseCode = ResponseCode(*b"25");
    /// `30` format error.
    pub const FORMAT_ERROR: ResponseCode = ResponseCode(*b"30");
    /// `61` exceeds amount limit.
    pub const OVER_LIMIT: ResponseCode = ResponseCode(*b"61");
    /// `64` amount does not match the original.
    pub const AMOUNT_MISMATCH: ResponseCode = ResponseCode(*b"64");
    /// `77` batch number mismatch: sign on again.
    pub const BATCH_MISMATCH: ResponseCode = ResponseCode(*b"77");
    /// `91` issuer unavailable.
    pub const ISSUER_UNAVAILABLE: ResponseCode = ResponseCode(*b"91");
    /// `94` duplicate transmission.
    pub const DUPLICATE: ResponseCode = ResponseCode(*b"94");
    /// `96` system malfunction.
    pub const SYSTEM_ERROR: ResponseCode = ResponseCode(*b"96");
    /// `97` terminal not registered.
    pub const UNKNOWN_TERMINAL: ResponseCode = ResponseCode(*b"97");
    /// `98` issuer did not answer in time.
    pub const ISSUER_TIMEOUT: ResponseCode = ResponseCode(*b"98");
    /// `A0` MAC failure.
    pub const MAC_FAILURE: ResponseCode = ResponseCode(*b"A0");

    /// A code from its two characters (letters and digits).
    pub fn new(code: &str) -> Option<ResponseCode> {
        let b = code.as_bytes();
        (b.len() == 2 && b.iter().all(u8::is_ascii_alphanumeric))
            .then(|| ResponseCode([b[0], b[1]]))
    }

    /// The two characters.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("ASCII")
    }

    /// True for `00`.
    pub fn is_approved(&self) -> bool {
        *self == ResponseCode::APPROVED
    }
}

impl fmt::Display for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseCode({})", self.as_str())
    }
}

/// What a terminal message asks for (terminal-cup.md, the message table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 0800, F60.3 001/003/004.
    SignOn,
    /// 0820, F60.3 002.
    SignOff,
    /// 0820, F60.3 301.
    Echo,
    /// 0200, F3 310000.
    BalanceInquiry,
    /// 0200, F3 000000, F25 00.
    Purchase,
    /// 0200, F3 200000, F25 00.
    Void,
    /// 0220, F3 200000, F25 00.
    Refund,
    /// 0100, F3 030000, F25 06.
    PreAuth,
    /// 0100, F3 200000, F25 06.
    PreAuthCancel,
    /// 0200, F3 000000, F25 06.
    Completion,
    /// 0220, F3 000000, F25 06.
    CompletionAdvice,
    /// 0200, F3 200000, F25 06.
    CompletionVoid,
    /// 0400.
    Reversal,
    /// 0500.
    Settlement,
    /// 0320, F60.3 201.
    BatchUpload,
    /// 0320, F60.3 202.
    BatchUploadEnd,
}

impl Kind {
    /// Classifies a terminal message by MTI, F3, F25 and F60.3.
    pub fn classify(
        mti: u16,
        processing_code: &str,
        condition: &str,
        network_code: &str,
    ) -> Option<Kind> {
        Some(match (mti, processing_code, condition) {
            (800, _, _) if matches!(network_code, "001" | "003" | "004") => Kind::SignOn,
            (820, _, _) if network_code == "002" => Kind::SignOff,
            (820, _, _) if network_code == "301" => Kind::Echo,
            (200, "310000", _) => Kind::BalanceInquiry,
            (200, "000000", "00") => Kind::Purchase,
            (200, "200000", "00") => Kind::Void,
            (220, "200000", "00") => Kind::Refund,
            (100, "030000", "06") => Kind::PreAuth,
            (100, "200000", "06") => Kind::PreAuthCancel,
            (200, "000000", "06") => Kind::Completion,
            (220, "000000", "06") => Kind::CompletionAdvice,
            (200, "200000", "06") => Kind::CompletionVoid,
            (400, _, _) => Kind::Reversal,
            (500, _, _) => Kind::Settlement,
            (320, _, _) if network_code == "201" => Kind::BatchUpload,
            (320, _, _) if network_code == "202" => Kind::BatchUploadEnd,
            _ => return None,
        })
    }

    /// The journal's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SignOn => "sign_on",
            Kind::SignOff => "sign_off",
            Kind::Echo => "echo",
            Kind::BalanceInquiry => "balance_inquiry",
            Kind::Purchase => "purchase",
            Kind::Void => "void",
            Kind::Refund => "refund",
            Kind::PreAuth => "preauth",
            Kind::PreAuthCancel => "preauth_cancel",
            Kind::Completion => "completion",
            Kind::CompletionAdvice => "completion_advice",
            Kind::CompletionVoid => "completion_void",
            Kind::Reversal => "reversal",
            Kind::Settlement => "settlement",
            Kind::BatchUpload => "batch_upload",
            Kind::BatchUploadEnd => "batch_upload_end",
        }
    }
}

/// The state of a journal entry (rules.md, "States of a journal entry").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Journalled, decided by the switch in a following statement.
    Received,
    /// Written before the issuer is asked.
    Sent,
    /// The issuer approved.
    Approved,
    /// The issuer (or the switch) declined.
    Declined,
    /// No answer in time: a reversal advice is queued.
    Unknown,
}

impl State {
    /// The journal's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Received => "received",
            State::Sent => "sent",
            State::Approved => "approved",
            State::Declined => "declined",
            State::Unknown => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_message_table() {
        assert_eq!(Kind::classify(800, "", "", "001"), Some(Kind::SignOn));
        assert_eq!(Kind::classify(820, "", "", "301"), Some(Kind::Echo));
        assert_eq!(
            Kind::classify(200, "310000", "00", "000"),
            Some(Kind::BalanceInquiry)
        );
        assert_eq!(
            Kind::classify(200, "000000", "00", "000"),
            Some(Kind::Purchase)
        );
        assert_eq!(
            Kind::classify(200, "000000", "06", "000"),
            Some(Kind::Completion)
        );
        assert_eq!(
            Kind::classify(220, "200000", "00", "000"),
            Some(Kind::Refund)
        );
        assert_eq!(Kind::classify(200, "999999", "00", "000"), None);
        assert_eq!(Kind::classify(800, "", "", "999"), None);
    }

    #[test]
    fn response_codes() {
        assert_eq!(ResponseCode::new("A0"), Some(ResponseCode::MAC_FAILURE));
        assert_eq!(ResponseCode::new("0"), None);
        assert!(ResponseCode::APPROVED.is_approved());
    }
}
