//! What a sandbox's DNS message may be, and what of it goes on: the pure message
//! work of the listener, all of it through hickory-proto.
//!
//! Only a standard query (QR=0, opcode QUERY) with exactly one question is
//! judged and forwarded, and what is forwarded is a message built afresh around
//! that question: nothing else the sandbox wrote (its answer, authority and
//! additional records, EDNS options, header bits) reaches a resolver, so no
//! part of a message can carry data past the judgement of its name.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::ProtoError;

/// The UDP payload size the listener advertises to resolvers (the DNS flag
/// day 2020 value: no IP fragmentation on common paths).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// A reply over UDP to a client without EDNS fits in this (RFC 1035).
const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// How a query came, and so how large its reply may be and how a reply too
/// large for UDP is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A truncated reply is passed on: the client asks again over TCP.
    Udp,
    /// A truncated reply is fetched again over TCP.
    Tcp,
}

/// Why a message is not judged as a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The reply's code; `None`: no reply at all (a "query" that is a response
    /// is not answered, so two sockets cannot be made to bounce messages).
    pub code: Option<ResponseCode>,
    /// The log entry's `rule`.
    pub rule: &'static str,
    /// The log entry's `error`.
    pub error: String,
}

/// The one question of a standard query, or why the message is refused.
pub fn question(request: &Message) -> Result<&Query, Refusal> {
    if request.message_type() != MessageType::Query {
        return Err(Refusal {
            code: None,
            rule: "dns:malformed",
            error: "a response (QR=1) sent as a query".to_string(),
        });
    }
    if request.op_code() != OpCode::Query {
        return Err(Refusal {
            code: Some(ResponseCode::NotImp),
            rule: "dns:opcode",
            error: format!(
                "opcode {:?}: only standard queries are served",
                request.op_code()
            ),
        });
    }
    match request.queries() {
        [one] => Ok(one),
        questions => Err(Refusal {
            // RFC 9619: a query must hold exactly one question; FORMERR otherwise.
            code: Some(ResponseCode::FormErr),
            rule: "dns:questions",
            error: format!(
                "{} questions in one message ({}): one is served",
                questions.len(),
                questions
                    .iter()
                    .map(|q| q.name().to_ascii())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

/// The query sent to a resolver for `request`'s judged `question`, with our
/// `id`: a fresh header (RD set; CD as the client asked, as a validating stub
/// needs it), the one question, and an OPT record of our own where one helps
/// (see [`upstream_payload`]) carrying the client's DO bit and no options.
pub fn rebuild(
    request: &Message,
    question: &Query,
    id: u16,
    transport: Transport,
) -> Result<Vec<u8>, ProtoError> {
    let mut query = Message::new();
    query
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .set_checking_disabled(request.checking_disabled())
        .add_query(question.clone());
    if let Some(payload) = upstream_payload(request, transport) {
        let mut edns = Edns::new();
        edns.set_max_payload(payload).set_version(0).set_dnssec_ok(
            request
                .extensions()
                .as_ref()
                .is_some_and(|e| e.flags().dnssec_ok),
        );
        query.set_edns(edns);
    }
    query.to_vec()
}

/// The UDP payload size to advertise upstream, `None` for no OPT record: a reply
/// returned over UDP must fit what the client said it takes (512 without EDNS);
/// one returned over TCP may be as large as a resolver sends.
fn upstream_payload(request: &Message, transport: Transport) -> Option<u16> {
    match (transport, request.extensions()) {
        (Transport::Tcp, _) => Some(MAX_UDP_PAYLOAD),
        (Transport::Udp, Some(edns)) => Some(
            edns.max_payload()
                .clamp(CLASSIC_UDP_PAYLOAD, MAX_UDP_PAYLOAD),
        ),
        (Transport::Udp, None) => None,
    }
}

/// Whether `reply` answers the query we sent as `id` for `question`: a stale
/// reply, another query's, or a forged one is not.
pub fn answers(reply: &Message, id: u16, question: &Query) -> bool {
    reply.message_type() == MessageType::Response
        && reply.id() == id
        && reply.op_code() == OpCode::Query
        // Names compare without regard to case, as resolvers may echo them.
        && reply.queries() == std::slice::from_ref(question)
}

/// The resolver's `reply` as the client gets it: under the client's id, without
/// an OPT record it did not ask for, and truncated (TC, no records) when it
/// would not fit the client's UDP payload size.
pub fn to_client(
    request: &Message,
    mut reply: Message,
    transport: Transport,
) -> Result<Vec<u8>, ProtoError> {
    reply.set_id(request.id());
    if request.extensions().is_none() {
        *reply.extensions_mut() = None;
    }
    let bytes = reply.to_vec()?;
    let limit = match (transport, request.extensions()) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, Some(edns)) => usize::from(edns.max_payload().max(CLASSIC_UDP_PAYLOAD)),
        (Transport::Udp, None) => usize::from(CLASSIC_UDP_PAYLOAD),
    };
    if bytes.len() <= limit {
        return Ok(bytes);
    }
    reply.truncate().to_vec()
}

/// A reply of the listener's own to `request` (same id and opcode, its questions).
pub fn respond(
    request: &Message,
    code: ResponseCode,
    answers: Vec<hickory_proto::rr::Record>,
) -> Option<Vec<u8>> {
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    response.add_queries(request.queries().iter().cloned());
    response.add_answers(answers);
    response.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, TXT};
    use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
    use std::str::FromStr;

    fn q(name: &str) -> Query {
        Query::query(Name::from_str(name).unwrap(), RecordType::A)
    }

    fn query(names: &[&str]) -> Message {
        let mut m = Message::new();
        m.set_id(0x1234).set_recursion_desired(true);
        for name in names {
            m.add_query(q(name));
        }
        m
    }

    fn txt(name: &str, data: &str) -> Record {
        Record::from_rdata(
            Name::from_str(name).unwrap(),
            60,
            RData::TXT(TXT::new(vec![data.to_string()])),
        )
    }

    #[test]
    fn a_message_with_other_than_one_question_is_a_format_error() {
        let two = query(&["api.test.", "blocked.test."]);
        let refusal = question(&two).unwrap_err();
        assert_eq!(refusal.code, Some(ResponseCode::FormErr));
        assert_eq!(refusal.rule, "dns:questions");
        assert!(
            refusal.error.contains("api.test., blocked.test."),
            "{refusal:?}"
        );
        assert_eq!(
            question(&query(&[])).unwrap_err().code,
            Some(ResponseCode::FormErr)
        );
        assert_eq!(question(&query(&["api.test."])).unwrap(), &q("api.test."));
    }

    #[test]
    fn only_standard_queries_are_served() {
        let mut update = query(&["api.test."]);
        update.set_op_code(OpCode::Update);
        assert_eq!(
            question(&update).unwrap_err().code,
            Some(ResponseCode::NotImp)
        );
        let mut response = query(&["api.test."]);
        response.set_message_type(MessageType::Response);
        let refusal = question(&response).unwrap_err();
        assert_eq!(refusal.code, None, "a response is not answered");
        assert_eq!(refusal.rule, "dns:malformed");
    }

    #[test]
    fn the_forwarded_query_holds_the_question_and_nothing_else_of_the_clients() {
        let mut request = query(&["api.test."]);
        request
            .set_recursion_desired(false)
            .set_authoritative(true)
            .set_checking_disabled(true)
            .add_answer(txt("a.test.", "secret-1"))
            .add_name_server(txt("b.test.", "secret-2"))
            .add_additional(txt("c.test.", "secret-3"));
        let mut edns = Edns::new();
        edns.set_max_payload(4096).set_dnssec_ok(true);
        edns.options_mut()
            .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(
                65001,
                b"secret-4".to_vec(),
            ));
        request.set_edns(edns);
        // Through the wire and back, as the listener gets it.
        let request = Message::from_vec(&request.to_vec().unwrap()).unwrap();
        let question = question(&request).unwrap().clone();

        let bytes = rebuild(&request, &question, 0xbeef, Transport::Udp).unwrap();
        let sent = Message::from_vec(&bytes).unwrap();
        assert_eq!(sent.id(), 0xbeef);
        assert_eq!(sent.queries(), std::slice::from_ref(&question));
        assert!(sent.answers().is_empty());
        assert!(sent.name_servers().is_empty());
        assert!(sent.additionals().is_empty());
        assert!(sent.recursion_desired(), "RD always");
        assert!(!sent.authoritative());
        assert!(sent.checking_disabled(), "CD as the client asked");
        let edns = sent.extensions().as_ref().expect("our own OPT");
        assert_eq!(edns.max_payload(), MAX_UDP_PAYLOAD, "capped");
        assert!(edns.flags().dnssec_ok);
        assert!(
            edns.options().as_ref().is_empty(),
            "no option of the client's"
        );
        for secret in ["secret-1", "secret-2", "secret-3", "secret-4"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} passed"
            );
        }
    }

    #[test]
    fn an_opt_record_is_added_only_where_the_reply_may_be_larger_than_512() {
        let plain = query(&["api.test."]);
        let question = q("api.test.");
        let udp = Message::from_vec(&rebuild(&plain, &question, 1, Transport::Udp).unwrap());
        assert!(udp.unwrap().extensions().is_none());
        let tcp = Message::from_vec(&rebuild(&plain, &question, 1, Transport::Tcp).unwrap());
        let tcp = tcp.unwrap();
        assert_eq!(tcp.extensions().as_ref().unwrap().max_payload(), 1232);
        assert!(!tcp.extensions().as_ref().unwrap().flags().dnssec_ok);

        let mut small = query(&["api.test."]);
        let mut edns = Edns::new();
        edns.set_max_payload(100);
        small.set_edns(edns);
        let sent = Message::from_vec(&rebuild(&small, &question, 1, Transport::Udp).unwrap());
        assert_eq!(
            sent.unwrap().extensions().as_ref().unwrap().max_payload(),
            512
        );
    }

    fn reply_to(id: u16, names: &[&str]) -> Message {
        let mut m = query(names);
        m.set_id(id).set_message_type(MessageType::Response);
        m
    }

    #[test]
    fn only_a_reply_to_our_id_and_question_answers_it() {
        let question = q("api.test.");
        assert!(answers(&reply_to(7, &["api.test."]), 7, &question));
        assert!(
            answers(&reply_to(7, &["API.Test."]), 7, &question),
            "case aside"
        );
        assert!(!answers(&reply_to(8, &["api.test."]), 7, &question));
        assert!(!answers(&reply_to(7, &["other.test."]), 7, &question));
        assert!(!answers(&reply_to(7, &[]), 7, &question));
        assert!(!answers(
            &reply_to(7, &["api.test.", "api.test."]),
            7,
            &question
        ));
        assert!(!answers(
            &query(&["api.test."]).set_id(7).clone(),
            7,
            &question
        ));
        let mut other_class = reply_to(7, &[]);
        let mut chaos = question.clone();
        chaos.set_query_class(DNSClass::CH);
        other_class.add_query(chaos);
        assert!(!answers(&other_class, 7, &question));
    }

    #[test]
    fn the_client_gets_its_own_id_and_a_reply_that_fits() {
        let request = query(&["api.test."]);
        let mut reply = reply_to(0xbeef, &["api.test."]);
        reply.add_answer(Record::from_rdata(
            Name::from_str("api.test.").unwrap(),
            60,
            RData::A(A::new(127, 0, 0, 2)),
        ));
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        reply.set_edns(edns);
        let got = Message::from_vec(&to_client(&request, reply, Transport::Udp).unwrap()).unwrap();
        assert_eq!(got.id(), 0x1234);
        assert_eq!(got.answers().len(), 1);
        assert!(got.extensions().is_none(), "the client sent no OPT");

        // Too large for a client without EDNS: truncated, so it asks over TCP.
        let mut large = reply_to(0xbeef, &["api.test."]);
        for i in 0..20 {
            large.add_answer(txt("api.test.", &format!("{i:040}")));
        }
        let got = to_client(&request, large.clone(), Transport::Udp).unwrap();
        assert!(got.len() <= 512);
        let got = Message::from_vec(&got).unwrap();
        assert!(got.truncated());
        assert!(got.answers().is_empty());
        let whole = to_client(&request, large, Transport::Tcp).unwrap();
        assert_eq!(Message::from_vec(&whole).unwrap().answers().len(), 20);
    }
}
