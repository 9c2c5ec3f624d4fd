//! How logical topics map onto broker streams: every broker binding keeps one stream (NATS
//! stream, Kafka topic, Redis stream) per `ampy.{env}.{domain}.{version}`.

use crate::topic::TopicPattern;

/// `ampy.{env}.{domain}.{version}` of a topic (its first four tokens).
pub(crate) fn stream_of(topic: &str) -> &str {
    let mut end = topic.len();
    let mut dots = 0;
    for (i, c) in topic.char_indices() {
        if c == '.' {
            dots += 1;
            if dots == 4 {
                end = i;
                break;
            }
        }
    }
    &topic[..end]
}

/// Whether topics in the stream `name` (`ampy.{env}.{domain}.{version}`) may match `pattern`.
pub(crate) fn stream_may_match(name: &str, pattern: &TopicPattern) -> bool {
    let st: Vec<&str> = name.split('.').collect();
    if st.len() != 4 || st[0] != "ampy" {
        return false;
    }
    let pt: Vec<&str> = pattern.as_str().split('.').collect();
    for (i, s) in st.iter().enumerate() {
        match pt.get(i) {
            None => return false,
            Some(&">") => return true,
            Some(&"*") => {}
            Some(p) if p == s => {}
            Some(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TopicPattern {
        TopicPattern::parse(s).unwrap()
    }

    #[test]
    fn streams_of_topics_and_patterns() {
        assert!(stream_may_match("ampy.dev.bars.v1", &p("ampy.dev.>")));
        assert!(stream_may_match("ampy.dev.bars.v1", &p("ampy.*.bars.v1.x")));
        assert!(!stream_may_match("ampy.dev.bars.v1", &p("ampy.prod.>")));
        assert!(!stream_may_match("other", &p(">")));
        assert_eq!(stream_of("ampy.dev.bars.v1.XNAS.AAPL"), "ampy.dev.bars.v1");
        assert_eq!(stream_of("ampy.dev.bars.v1"), "ampy.dev.bars.v1");
    }
}
